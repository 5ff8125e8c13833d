//! `knit sim --plot`: draws a run's metrics over its steps as an SVG file.
//!
//! Six panels stacked on one step axis (knowledge exceptions, knowledge bytes at the
//! largest and on average, tombstones held, conflicts and changes sent), one line per
//! seed, with the workload's steps first and
//! the full-mesh convergence rounds after them, past a dashed line where faults stop.
//!
//! Invariants:
//! - The picture depends only on the reports: no clock, no system font (plotters'
//!   built-in text estimate, as its `ttf` feature is off), no hash-map order, so a seed
//!   and a commit give the same bytes, like the rest of the simulator.
//! - The file appears whole or not at all: the SVG is drawn in memory, written to a
//!   hidden sibling and renamed over `path`, and the sibling is removed on failure.

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::{SimReport, StepMetrics};

/// At most this many seeds get a line; more would make the panels unreadable and the
/// legend taller than a panel. The title says when runs were left out.
pub const MAX_PLOTTED_SEEDS: usize = 8;

const WIDTH_PX: u32 = 1000;
const PANEL_HEIGHT_PX: u32 = 220;
const TITLE_HEIGHT_PX: u32 = 40;
/// Two rows of legend entries: eight seeds and the faults line overflow one.
const LEGEND_HEIGHT_PX: u32 = 50;
const LEGEND_ROW_PX: i32 = 22;
const LEGEND_LEFT_PX: i32 = 70;
const LEGEND_SWATCH_PX: i32 = 24;
const FONT: &str = "sans-serif";

/// Okabe and Ito's palette (its yellow left out: too pale on white), which readers
/// with colour-blindness can tell apart; one colour per plotted seed.
const SEED_COLOURS: [RGBColor; MAX_PLOTTED_SEEDS] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(0, 0, 0),
    RGBColor(153, 153, 153),
];
/// Dashed and darker than the grid, so it does not read as a grid line.
const FAULTS_STOP_COLOUR: RGBColor = RGBColor(90, 90, 90);

/// One panel: what it draws and how its axis reads.
struct Metric {
    /// The panel's caption; tests look for it in the file.
    label: &'static str,
    /// The y axis's description: the unit counted.
    unit: &'static str,
    value: fn(&StepMetrics) -> u64,
}

const METRICS: [Metric; 6] = [
    Metric {
        label: "knowledge exceptions (max over replicas)",
        unit: "exceptions",
        value: |m| m.exceptions_max,
    },
    Metric {
        label: "knowledge size in bytes (max over replicas)",
        unit: "bytes",
        value: |m| m.knowledge_bytes_max,
    },
    Metric {
        label: "knowledge size in bytes (mean over replicas)",
        unit: "bytes",
        value: |m| m.knowledge_bytes_mean,
    },
    Metric {
        label: "tombstones held (sum over replicas)",
        unit: "tombstones",
        value: |m| m.tombstones,
    },
    Metric {
        label: "conflicts per step",
        unit: "conflicts",
        value: |m| m.conflicts.total(),
    },
    Metric {
        label: "changes sent per step",
        unit: "changes",
        value: |m| m.changes_sent,
    },
];

/// Why no plot was written. Every variant names the file asked for.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlotError {
    #[error("cannot write the plot {}: the folder {} does not exist", path.display(), folder.display())]
    NoFolder { path: PathBuf, folder: PathBuf },
    #[error("cannot write the plot {}: no run passed its checks, so there is nothing to draw", path.display())]
    NoRuns { path: PathBuf },
    #[error("cannot draw the plot {}: {detail}", path.display())]
    Draw { path: PathBuf, detail: String },
    #[error("cannot write the plot {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Fails unless `path`'s folder exists, so a caller can refuse a mistyped path before
/// spending minutes on a simulation. [`plot_reports`] checks it again.
pub fn check_plot_path(path: &Path) -> Result<(), PlotError> {
    match path.parent() {
        // A bare file name lands in the working folder, which exists.
        Some(folder) if !folder.as_os_str().is_empty() && !folder.is_dir() => {
            Err(PlotError::NoFolder {
                path: path.to_path_buf(),
                folder: folder.to_path_buf(),
            })
        }
        _ => Ok(()),
    }
}

/// Draws the reports (runs of one scenario, one line per seed, the first
/// [`MAX_PLOTTED_SEEDS`] of them) into an SVG file at `path`, replacing it.
pub fn plot_reports(reports: &[SimReport], path: &Path) -> Result<(), PlotError> {
    check_plot_path(path)?;
    if reports.is_empty() {
        return Err(PlotError::NoRuns {
            path: path.to_path_buf(),
        });
    }
    let svg = render(reports).map_err(|detail| PlotError::Draw {
        path: path.to_path_buf(),
        detail,
    })?;
    write_whole(path, svg.as_bytes()).map_err(|source| PlotError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// The title: the scenario and the seeds drawn, and how many runs were left out.
fn title(reports: &[SimReport]) -> String {
    let drawn = &reports[..reports.len().min(MAX_PLOTTED_SEEDS)];
    let seeds: Vec<String> = drawn.iter().map(|r| r.seed.to_string()).collect();
    let Some(first) = drawn.first() else {
        return "knit sim: no runs".into();
    };
    let word = if drawn.len() == 1 { "seed" } else { "seeds" };
    let mut title = format!(
        "knit sim: scenario {}, {} replicas, {word} {}",
        first.scenario,
        first.replicas,
        seeds.join(", ")
    );
    if reports.len() > drawn.len() {
        title.push_str(&format!(
            " (first {} of {} runs)",
            drawn.len(),
            reports.len()
        ));
    }
    title
}

/// A run's metrics in drawing order: workload steps, then convergence rounds, with the
/// x position of each (the step axis counts both, so rounds continue after the steps).
fn series(report: &SimReport, value: fn(&StepMetrics) -> u64) -> Vec<(u64, u64)> {
    report
        .steps
        .iter()
        .chain(&report.convergence)
        .zip(0u64..)
        .map(|(m, x)| (x, value(m)))
        .collect()
}

fn len_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// The SVG text, or what plotters reported.
fn render(reports: &[SimReport]) -> Result<String, String> {
    let drawn = &reports[..reports.len().min(MAX_PLOTTED_SEEDS)];
    let first = drawn.first().ok_or("there are no runs to draw")?;
    // Every run of a scenario has the same number of workload steps; convergence
    // rounds differ by seed, so the axis spans the longest run.
    let faults_stop = len_u64(first.steps.len());
    let x_end = drawn
        .iter()
        .map(|r| len_u64(r.steps.len() + r.convergence.len()))
        .max()
        .unwrap_or(1)
        .max(1);
    let panels = u32::try_from(METRICS.len()).map_err(|e| e.to_string())?;
    let height = TITLE_HEIGHT_PX + LEGEND_HEIGHT_PX + panels * PANEL_HEIGHT_PX;

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH_PX, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let root = root
            .titled(&title(reports), (FONT, 22))
            .map_err(|e| e.to_string())?;
        // The panels share their colours, so one legend in a strip of its own serves
        // them all and covers no line.
        let (legend, body) = root.split_vertically(LEGEND_HEIGHT_PX);
        draw_legend(&legend, drawn)?;
        let areas = body.split_evenly((METRICS.len(), 1));
        for (index, (area, metric)) in areas.iter().zip(&METRICS).enumerate() {
            let y_top = drawn
                .iter()
                .flat_map(|r| series(r, metric.value))
                .map(|(_, y)| y)
                .max()
                .unwrap_or(0);
            // Headroom above the highest point, and a non-empty range when all are 0.
            let y_end = y_top + y_top / 10 + 1;
            let mut chart = ChartBuilder::on(area)
                .margin(10)
                .caption(metric.label, (FONT, 16))
                .x_label_area_size(35)
                .y_label_area_size(60)
                .build_cartesian_2d(0..x_end, 0..y_end)
                .map_err(|e| e.to_string())?;
            let mut mesh = chart.configure_mesh();
            mesh.y_desc(metric.unit).light_line_style(WHITE);
            // The panels share the step axis: its description goes under the last one.
            if index + 1 == METRICS.len() {
                mesh.x_desc("step (workload steps, then full-mesh convergence rounds)");
            }
            mesh.draw().map_err(|e| e.to_string())?;
            chart
                .draw_series(DashedLineSeries::new(
                    [(faults_stop, 0), (faults_stop, y_end)],
                    6,
                    4,
                    FAULTS_STOP_COLOUR.stroke_width(1),
                ))
                .map_err(|e| e.to_string())?;
            for (report, colour) in drawn.iter().zip(SEED_COLOURS) {
                chart
                    .draw_series(LineSeries::new(
                        series(report, metric.value),
                        colour.stroke_width(2),
                    ))
                    .map_err(|e| e.to_string())?;
            }
        }
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

/// One entry per seed and one for the dashed line, left to right, wrapping to a second
/// row when the first is full.
fn draw_legend(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    drawn: &[SimReport],
) -> Result<(), String> {
    let text = (FONT, 14)
        .into_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Left, VPos::Center));
    let mut entries = vec![(
        "faults stop, convergence rounds begin".to_string(),
        FAULTS_STOP_COLOUR.stroke_width(1),
        true,
    )];
    entries.extend(
        drawn
            .iter()
            .zip(SEED_COLOURS)
            .map(|(r, colour)| (format!("seed {}", r.seed), colour.stroke_width(2), false)),
    );
    let right = i32::try_from(WIDTH_PX).map_err(|e| e.to_string())? - LEGEND_LEFT_PX;
    let (mut x, mut y) = (LEGEND_LEFT_PX, LEGEND_ROW_PX / 2);
    for (label, style, dashed) in entries {
        let (text_width, _) = area
            .estimate_text_size(&label, &text)
            .map_err(|e| e.to_string())?;
        let width = LEGEND_SWATCH_PX + 6 + i32::try_from(text_width).map_err(|e| e.to_string())?;
        if x > LEGEND_LEFT_PX && x + width > right {
            (x, y) = (LEGEND_LEFT_PX, y + LEGEND_ROW_PX);
        }
        let swatch: Vec<[(i32, i32); 2]> = if dashed {
            vec![
                [(x, y), (x + 9, y)],
                [(x + 15, y), (x + LEGEND_SWATCH_PX, y)],
            ]
        } else {
            vec![[(x, y), (x + LEGEND_SWATCH_PX, y)]]
        };
        for segment in swatch {
            area.draw(&PathElement::new(segment, style))
                .map_err(|e| e.to_string())?;
        }
        area.draw(&Text::new(
            label,
            (x + LEGEND_SWATCH_PX + 6, y),
            text.clone(),
        ))
        .map_err(|e| e.to_string())?;
        x += width + 24;
    }
    Ok(())
}

/// Writes `bytes` to a hidden sibling of `path`, then renames it over `path`, so a
/// reader never sees half a file and a failed write leaves none behind.
pub(crate) fn write_whole(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path names no file")
    })?;
    let mut hidden = std::ffi::OsString::from(".");
    hidden.push(name);
    hidden.push(".tmp");
    let temporary = path.with_file_name(hidden);
    let written =
        std::fs::write(&temporary, bytes).and_then(|()| std::fs::rename(&temporary, path));
    if written.is_err() {
        // Best effort: the write's own error is the one worth reporting.
        let _ = std::fs::remove_file(&temporary);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(seed: u64, steps: u64) -> SimReport {
        SimReport {
            scenario: "tiny".into(),
            seed,
            replicas: 3,
            steps: (0..steps)
                .map(|step| StepMetrics {
                    step,
                    changes_sent: step * 2,
                    tombstones: step % 3,
                    ..StepMetrics::default()
                })
                .collect(),
            convergence: vec![StepMetrics::default()],
            rounds_to_converge: 0,
            versions_made: steps,
        }
    }

    #[test]
    fn the_title_names_the_scenario_and_seeds_and_says_what_was_left_out() {
        assert_eq!(
            title(&[report(4, 2)]),
            "knit sim: scenario tiny, 3 replicas, seed 4"
        );
        let many: Vec<SimReport> = (0..10).map(|s| report(s, 2)).collect();
        assert_eq!(
            title(&many),
            "knit sim: scenario tiny, 3 replicas, seeds 0, 1, 2, 3, 4, 5, 6, 7 (first 8 of 10 runs)"
        );
    }

    #[test]
    fn convergence_rounds_continue_the_step_axis() {
        let points = series(&report(0, 3), |m| m.changes_sent);
        assert_eq!(points, vec![(0, 0), (1, 2), (2, 4), (3, 0)]);
    }

    #[test]
    fn a_run_of_all_zeros_still_draws() -> Result<(), String> {
        let svg = render(&[report(0, 0)])?;
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
        Ok(())
    }
}
