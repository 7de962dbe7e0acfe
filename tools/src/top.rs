//! `fepctl top`: a live terminal view of a running fep — per service, each
//! node's share of live routes as a bar against its target, its ratios,
//! state and load; packet and drop rates from counter deltas.

use std::time::{Duration, Instant};

use anyhow::Context;
use fep_shared::api::{CountersView, StatusView};
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph, Row, Table};
use ratatui::{Frame, Terminal};

use crate::admin_client::{get, AdminAddress};

/// A 0–1 fraction as a percentage.
pub fn pct(fraction: f64) -> String {
    format!("{:.1}%", fraction * 100.0)
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
    now: StatusView,
    rates: Option<(f64, f64, f64)>,
}

fn sample(to: &AdminAddress, last: &mut Option<(Instant, CountersView)>) -> anyhow::Result<View> {
    let now: StatusView = get(to, "/v1/status")?;
    let drops = |c: &CountersView| c.drops.values().sum::<u64>() as f64;
    let rates = last.as_ref().map(|(at, prev)| {
        let secs = at.elapsed().as_secs_f64().max(1e-3);
        let c = &now.counters;
        (
            (c.to_backend_packets as f64 - prev.to_backend_packets as f64) / secs,
            (c.to_client_packets as f64 - prev.to_client_packets as f64) / secs,
            (drops(c) - drops(prev)) / secs,
        )
    });
    *last = Some((Instant::now(), now.counters.clone()));
    Ok(View { now, rates })
}

fn draw(f: &mut Frame, view: &View) {
    let v = &view.now;
    let mut constraints = vec![Constraint::Length(3)];
    constraints.extend(
        v.services
            .iter()
            .map(|s| Constraint::Length(s.backends.len() as u16 + 3)),
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
        Line::from(format!("fep — {} live routes — {rates}", v.routes)),
        Line::from(
            "bars: share of live routes, | marks the target share (effective ratios); q quits",
        ),
    ])
    .block(Block::bordered().title(" fepctl top "));
    f.render_widget(header, areas[0]);
    for (i, svc) in v.services.iter().enumerate() {
        let rows = svc.backends.iter().map(|b| {
            Row::new(vec![
                b.node.clone(),
                if b.up { "up".into() } else { "down".into() },
                format!("{}/{}", b.configured_ratio, b.effective_ratio),
                b.routes.to_string(),
                bar(b.share, b.target_share, 20),
                format!("{} / {}", pct(b.share), pct(b.target_share)),
                b.load.map_or("-".into(), |l| format!("{l:.1}")),
                b.http.as_ref().map_or("-".into(), |h| {
                    format!("{}/{} x{:.1}", h.pool_idle, h.pool_busy, h.reuse)
                }),
            ])
            .style(if b.up {
                Style::default()
            } else {
                Style::default().fg(Color::Red)
            })
        });
        let title = format!(
            " {}{}{} ",
            svc.heading(),
            svc.http.as_ref().map_or(String::new(), |h| format!(
                " — {:.0} req/s",
                h.requests_per_s
            )),
            if svc.pruning {
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
            Constraint::Length(22),
            Constraint::Length(16),
            Constraint::Length(6),
            Constraint::Length(14),
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
                    "POOL i/b REUSE",
                ])
                .style(Style::default().add_modifier(Modifier::BOLD)),
            )
            .block(Block::bordered().title(title));
        f.render_widget(table, areas[i + 1]);
    }
}

/// Runs the live view until q, Esc or Ctrl-C; with `once`, prints one frame
/// as text instead.
pub fn run(to: &AdminAddress, every: Duration, once: bool) -> anyhow::Result<()> {
    let mut last = None;
    if once {
        let view = sample(to, &mut last)?;
        let rows = 6 + view
            .now
            .services
            .iter()
            .map(|s| s.backends.len() + 3)
            .sum::<usize>();
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
