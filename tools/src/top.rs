//! `fepctl top`: a live terminal view of a running fep — per service, each
//! node's share of live routes as a bar against its target, its ratios,
//! state and load; packet and drop rates from counter deltas.

use std::time::{Duration, Instant};

use anyhow::Context;
use fep_shared::api::{CountersView, ServiceView, StatusView};
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph, Row, Table};
use ratatui::{Frame, Terminal};

use crate::admin_client::{get, AdminAddress};

/// Cells of a share bar in `top` (one more for the target mark).
const BAR: usize = 10;

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

/// What a frame shows: the live routes, the services, and the rates from
/// two status samples.
struct View {
    routes: usize,
    closing: usize,
    services: Vec<ServiceView>,
    rates: Option<(f64, f64, f64)>,
}

/// The width `fepctl top` is laid out for: every column fits a terminal of
/// 80 (an HTTP service's pool column included).
pub const WIDTH: u16 = 80;

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
    Ok(View {
        routes: now.routes,
        closing: now.closing,
        services: now.services,
        rates,
    })
}

fn draw(f: &mut Frame, v: &View) {
    let mut constraints = vec![Constraint::Length(5)];
    constraints.extend(
        v.services
            .iter()
            .map(|s| Constraint::Length(s.backends.len() as u16 + 3)),
    );
    constraints.push(Constraint::Min(0));
    let areas = Layout::vertical(constraints).split(f.area());
    let rates = match v.rates {
        Some((b, c, d)) => {
            format!("{b:.0} pkt/s to back ends, {c:.0} pkt/s to clients, {d:.0} drops/s")
        }
        None => "measuring rates …".into(),
    };
    let header = Paragraph::new(vec![
        Line::from(format!(
            "fep — {} live routes, {} closing",
            v.routes, v.closing
        )),
        Line::from(rates),
        Line::from("bars: share of live routes, | the target share (effective ratios); q quits"),
    ])
    .block(Block::bordered().title(" fepctl top "));
    f.render_widget(header, areas[0]);
    for (i, svc) in v.services.iter().enumerate() {
        let http = svc.http.is_some();
        let rows = svc.backends.iter().map(|b| {
            let mut cells = vec![
                b.node.clone(),
                if b.up { "up".into() } else { "down".into() },
                format!("{}/{}", b.configured_ratio, b.effective_ratio),
                b.routes.to_string(),
                bar(b.share, b.target_share, BAR),
                format!("{}/{}", pct(b.share), pct(b.target_share)),
                b.load.map_or("-".into(), |l| format!("{l:.1}")),
            ];
            if http {
                cells.push(b.http.as_ref().map_or("-".into(), |h| {
                    format!("{}/{} x{:.1}", h.pool_idle, h.pool_busy, h.reuse)
                }));
            }
            Row::new(cells).style(if b.up {
                Style::default()
            } else {
                Style::default().fg(Color::Red)
            })
        });
        let title = format!(
            " {}{}{}{} ",
            svc.heading(),
            match svc.closing {
                0 => String::new(),
                n => format!(" — {n} closing"),
            },
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
        // 10+4+9+8+11+11+6 (+12 for HTTP's pool) and a space between
        // columns: 65 (78) of the 78 inside the borders at 80 columns.
        let mut widths = vec![
            Constraint::Length(10),
            Constraint::Length(4),
            Constraint::Length(9),
            Constraint::Length(8),
            Constraint::Length(BAR as u16 + 1),
            Constraint::Length(11),
            Constraint::Length(6),
        ];
        let mut header = vec![
            "NODE",
            "UP",
            "RATIO",
            "ROUTES",
            "SHARE",
            "NOW/TARGET",
            "LOAD",
        ];
        if http {
            widths.push(Constraint::Length(12));
            header.push("POOL i/b x");
        }
        let table = Table::new(rows, widths)
            .header(Row::new(header).style(Style::default().add_modifier(Modifier::BOLD)))
            .block(Block::bordered().title(title));
        f.render_widget(table, areas[i + 1]);
    }
}

/// One frame at [`WIDTH`] columns as lines of text (trailing blanks cut).
fn frame(view: &View) -> anyhow::Result<Vec<String>> {
    let rows = 8 + view
        .services
        .iter()
        .map(|s| s.backends.len() + 3)
        .sum::<usize>();
    let mut term = Terminal::new(TestBackend::new(WIDTH, rows as u16))?;
    term.draw(|f| draw(f, view))?;
    let buf = term.backend().buffer();
    Ok((0..buf.area.height)
        .map(|y| {
            let line: String = (0..buf.area.width)
                .map(|x| buf[(x, y)].symbol().to_string())
                .collect();
            line.trim_end().to_string()
        })
        .collect())
}

/// Runs the live view until q, Esc or Ctrl-C; with `once`, prints one frame
/// as text instead.
pub fn run(to: &AdminAddress, every: Duration, once: bool) -> anyhow::Result<()> {
    let mut last = None;
    if once {
        for line in frame(&sample(to, &mut last)?)? {
            println!("{line}");
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

#[cfg(test)]
mod tests {
    use fep_shared::api::{BackendView, HttpBackendView, HttpServiceView, Spare};
    use fep_shared::{Protocol, Scheduler};

    use super::*;

    fn backend(node: &str, routes: u32, share: f64, http: bool) -> BackendView {
        BackendView {
            node: node.into(),
            port: 80,
            configured_ratio: 1000,
            effective_ratio: 1000,
            routes,
            closing: 7,
            share,
            target_share: 0.5,
            up: true,
            overloaded: false,
            spare: Spare::No,
            load: Some(1234.5),
            http: http.then_some(HttpBackendView {
                requests: 9,
                pool_idle: 32,
                pool_busy: 32,
                connects: 1,
                reuse: 99.9,
                retries: 0,
                sessions: 0,
            }),
        }
    }

    fn service(name: &str, http: bool) -> ServiceView {
        ServiceView {
            name: name.into(),
            vip: "10.0.0.100".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
            scheduler: Scheduler::Ratio,
            routes: 1_500_000,
            closing: 1_234_567,
            pruning: false,
            backends: vec![
                backend("node-abcde", 1_000_000, 0.667, http),
                backend("be2", 500_000, 0.333, http),
            ],
            http: http.then(|| HttpServiceView {
                requests_per_s: 1.0,
                requests: 1,
                connections: 1,
                refused: Vec::new(),
            }),
        }
    }

    #[test]
    fn every_column_fits_80_columns_with_large_figures_and_an_http_pool() {
        let view = View {
            routes: 3_000_000,
            closing: 2_469_134,
            services: vec![service("web", false), service("api", true)],
            rates: Some((1e6, 1e6, 0.0)),
        };
        let lines = frame(&view).unwrap();
        assert!(lines
            .iter()
            .all(|l| l.chars().count() <= usize::from(WIDTH)));
        let text = lines.join("\n");
        for whole in [
            "3000000 live routes, 2469134 closing",
            "web tcp 10.0.0.100:80 scheduler ratio — 1234567 closing",
            "1000000 pkt/s to clients, 0 drops/s",
            "q quits",
            "POOL i/b x",
        ] {
            assert!(text.contains(whole), "{whole} cut: {text}");
        }
        for (node, routes, share) in [
            ("node-abcde", "1000000", "66.7%/50.0%"),
            ("be2", "500000", "33.3%/50.0%"),
        ] {
            let rows: Vec<&String> = lines.iter().filter(|l| l.contains(node)).collect();
            assert_eq!(rows.len(), 2, "a row per service: {text}");
            for row in rows {
                for cell in [routes, share, "1000/1000", "1234.5", "up"] {
                    assert!(row.contains(cell), "{cell} cut from {row:?}");
                }
                assert_eq!(
                    row.matches('|').count(),
                    1,
                    "the bar and its target mark: {row:?}"
                );
            }
        }
        let pool: Vec<&String> = lines.iter().filter(|l| l.contains("32/32 x99.9")).collect();
        assert_eq!(pool.len(), 2, "the HTTP service's pools: {text}");
    }
}
