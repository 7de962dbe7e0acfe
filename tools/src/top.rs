//! `fepctl top`: a live terminal view of a running fep — per service, each
//! node's share of live routes as a bar against its target, its ratios,
//! state and load; packet and drop rates from counter deltas.

use std::time::{Duration, Instant};

use anyhow::Context;
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph, Row, Table};
use ratatui::{Frame, Terminal};
use serde_json::Value;

use crate::admin_client::{call, Endpoint};

/// A JSON value as display text ("-" for null).
pub fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// A 0–1 fraction as a percentage.
pub fn pct(v: &Value) -> String {
    format!("{:.1}%", v.as_f64().unwrap_or(0.0) * 100.0)
}

/// A share bar `width` cells wide with a `|` at the target share.
pub fn bar(share: f64, target: f64, width: usize) -> String {
    let filled = (share.clamp(0.0, 1.0) * width as f64).round() as usize;
    let mark = ((target.clamp(0.0, 1.0) * width as f64).round() as usize).min(width);
    (0..=width)
        .map(|i| {
            if i == mark {
                '|'
            } else if i < filled {
                '█'
            } else {
                '·'
            }
        })
        .collect()
}

/// Two status samples, for rates.
struct View {
    now: Value,
    rates: Option<(f64, f64, f64)>,
}

fn sample(to: &Endpoint, last: &mut Option<(Instant, Value)>) -> anyhow::Result<View> {
    let now = call(to, "GET", "/v1/status", None)?;
    let counter = |v: &Value, k: &str| v["counters"][k].as_f64().unwrap_or(0.0);
    let drops = |v: &Value| {
        v["counters"]["drops"]
            .as_object()
            .map_or(0.0, |d| d.values().filter_map(Value::as_f64).sum())
    };
    let rates = last.as_ref().map(|(at, prev)| {
        let secs = at.elapsed().as_secs_f64().max(1e-3);
        (
            (counter(&now, "to_backend_packets") - counter(prev, "to_backend_packets")) / secs,
            (counter(&now, "to_client_packets") - counter(prev, "to_client_packets")) / secs,
            (drops(&now) - drops(prev)) / secs,
        )
    });
    *last = Some((Instant::now(), now.clone()));
    Ok(View { now, rates })
}

fn draw(f: &mut Frame, view: &View) {
    let v = &view.now;
    let services = v["services"].as_array().cloned().unwrap_or_default();
    let mut constraints = vec![Constraint::Length(3)];
    constraints.extend(
        services
            .iter()
            .map(|s| Constraint::Length(s["backends"].as_array().map_or(0, Vec::len) as u16 + 3)),
    );
    constraints.push(Constraint::Min(0));
    let areas = Layout::vertical(constraints).split(f.area());
    let rates = match view.rates {
        Some((b, c, d)) => {
            format!("{b:.0} pkt/s to back ends, {c:.0} pkt/s to clients, {d:.0} drops/s")
        }
        None => "measuring rates …".into(),
    };
    let header = Paragraph::new(vec![
        Line::from(format!("fep — {} live routes — {rates}", v["routes"])),
        Line::from(
            "bars: share of live routes, | marks the target share (effective ratios); q quits",
        ),
    ])
    .block(Block::bordered().title(" fepctl top "));
    f.render_widget(header, areas[0]);
    for (i, svc) in services.iter().enumerate() {
        let rows = svc["backends"].as_array().into_iter().flatten().map(|b| {
            let up = b["up"] == true;
            Row::new(vec![
                s(&b["node"]),
                if up { "up".into() } else { "down".into() },
                format!("{}/{}", b["configured_ratio"], b["effective_ratio"]),
                s(&b["routes"]),
                bar(
                    b["share"].as_f64().unwrap_or(0.0),
                    b["target_share"].as_f64().unwrap_or(0.0),
                    30,
                ),
                format!("{} / {}", pct(&b["share"]), pct(&b["target_share"])),
                b["load"].as_f64().map_or("-".into(), |l| format!("{l:.1}")),
            ])
            .style(if up {
                Style::default()
            } else {
                Style::default().fg(Color::Red)
            })
        });
        let title = format!(
            " {} {} {}:{} ({}){} ",
            s(&svc["name"]),
            s(&svc["protocol"]),
            s(&svc["vip"]),
            svc["port"],
            s(&svc["scheduler"]),
            if svc["pruning"] == true {
                " — pruning idle routes"
            } else {
                ""
            }
        );
        let widths = [
            Constraint::Length(12),
            Constraint::Length(5),
            Constraint::Length(9),
            Constraint::Length(7),
            Constraint::Length(32),
            Constraint::Length(16),
            Constraint::Length(8),
        ];
        let table = Table::new(rows, widths)
            .header(
                Row::new([
                    "NODE",
                    "STATE",
                    "RATIO",
                    "ROUTES",
                    "SHARE",
                    "SHARE / TARGET",
                    "LOAD",
                ])
                .style(Style::default().add_modifier(Modifier::BOLD)),
            )
            .block(Block::bordered().title(title));
        f.render_widget(table, areas[i + 1]);
    }
}

/// Runs the live view until q, Esc or Ctrl-C; with `once`, prints one frame
/// as text instead.
pub fn run(to: &Endpoint, every: Duration, once: bool) -> anyhow::Result<()> {
    let mut last = None;
    if once {
        let view = sample(to, &mut last)?;
        let rows = 6 + view.now["services"].as_array().map_or(0, |s| {
            s.iter()
                .map(|x| x["backends"].as_array().map_or(0, Vec::len) + 3)
                .sum()
        });
        let mut term = Terminal::new(TestBackend::new(100, rows as u16))?;
        term.draw(|f| draw(f, &view))?;
        let buf = term.backend().buffer();
        for y in 0..buf.area.height {
            let line: String = (0..buf.area.width)
                .map(|x| buf[(x, y)].symbol().to_string())
                .collect();
            println!("{}", line.trim_end());
        }
        return Ok(());
    }
    let mut term = ratatui::init();
    let result = (|| -> anyhow::Result<()> {
        loop {
            let view = sample(to, &mut last)?;
            term.draw(|f| draw(f, &view)).context("drawing")?;
            let until = Instant::now() + every;
            while Instant::now() < until {
                if event::poll(until - Instant::now())? {
                    if let Event::Key(k) = event::read()? {
                        let ctrl_c = k.code == KeyCode::Char('c')
                            && k.modifiers.contains(KeyModifiers::CONTROL);
                        if matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c {
                            return Ok(());
                        }
                    }
                }
            }
        }
    })();
    ratatui::restore();
    result
}
