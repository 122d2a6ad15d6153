//! `--plot FILE.svg` of the benchmarks: per-CPU times over the runs as
//! SVG, drawn with plotters (its SVG backend only).
//!
//! Each CPU gets its median over the runs (a point on a line) and its
//! range (a vertical bar from min to max); whole-machine times are
//! horizontal lines. The time axis is logarithmic: under TCG single runs
//! are ten times slower than the median when the host does not schedule
//! a vCPU thread, and the medians would otherwise sit flat at the bottom.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use super::shootdown::ShootdownResult;
use crate::bench::BenchResult;
use crate::stats::Spread;

/// The drawing's size in pixels.
const SIZE: (u32, u32) = (1100, 620);

/// One per-CPU series.
#[derive(Debug, Clone, PartialEq)]
pub struct PerCpu {
    /// Its legend.
    pub name: String,
    /// (CPU index, spread over the runs).
    pub points: Vec<(u32, Spread)>,
}

/// A horizontal line across the plot.
#[derive(Debug, Clone, PartialEq)]
pub struct Level {
    /// Its legend.
    pub name: String,
    /// Microseconds.
    pub us: f64,
}

/// What one plot shows.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    /// Its title.
    pub title: String,
    /// The x axis' name.
    pub x_label: String,
    /// Per-CPU series, each in its own colour.
    pub series: Vec<PerCpu>,
    /// Horizontal lines.
    pub levels: Vec<Level>,
}

impl Figure {
    /// The y range: a decade below the smallest value to a decade above
    /// the largest, so every point is inside; `None` when there is nothing
    /// positive to draw.
    fn y_range(&self) -> Option<(f64, f64)> {
        let values = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().flat_map(|(_, p)| [p.min, p.max]))
            .chain(self.levels.iter().map(|l| l.us))
            .filter(|v| *v > 0.0);
        let (low, high) = values.fold((f64::MAX, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
        (high > 0.0).then(|| {
            (
                10f64.powf(low.log10().floor()),
                10f64.powf(high.log10().ceil() + 0.3),
            )
        })
    }

    /// The highest CPU index drawn.
    fn last_cpu(&self) -> u32 {
        self.series
            .iter()
            .flat_map(|s| s.points.iter().map(|(cpu, _)| *cpu))
            .max()
            .unwrap_or(0)
    }
}

/// Colours of the series and levels, in order.
const COLOURS: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
];

/// Writes `figure` as SVG to `path`.
pub fn write_svg(figure: &Figure, path: &Path) -> Result<()> {
    let (low, high) = figure
        .y_range()
        .ok_or_else(|| anyhow!("nothing to plot: no sample above 0"))?;
    let plot = || -> Result<(), Box<dyn std::error::Error + '_>> {
        let root = SVGBackend::new(path, SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        let x_end = f64::from(figure.last_cpu()) + 0.5;
        let mut chart = ChartBuilder::on(&root)
            .caption(&figure.title, ("sans-serif", 20))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(80)
            .build_cartesian_2d(-0.5f64..x_end, (low..high).log_scale())?;
        chart
            .configure_mesh()
            .x_desc(&figure.x_label)
            .y_desc("microseconds (log scale)")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y}"))
            .light_line_style(WHITE.mix(0.0))
            .draw()?;
        let mut colours = COLOURS.iter().cycle();
        let count = figure.series.len() as f64;
        for (index, series) in figure.series.iter().enumerate() {
            let colour = *colours.next().unwrap_or(&BLACK);
            // Side by side: each series' bars a little apart.
            let shift = (index as f64 - (count - 1.0) / 2.0) * 0.22;
            chart.draw_series(series.points.iter().map(|(cpu, spread)| {
                let x = f64::from(*cpu) + shift;
                PathElement::new(
                    vec![(x, spread.min.max(low)), (x, spread.max.max(low))],
                    colour.mix(0.45).stroke_width(2),
                )
            }))?;
            chart
                .draw_series(LineSeries::new(
                    series
                        .points
                        .iter()
                        .map(|(cpu, spread)| (f64::from(*cpu) + shift, spread.median.max(low))),
                    colour.stroke_width(2),
                ))?
                .label(format!("{} (median, bar: min to max)", series.name))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 24, y)], colour.stroke_width(2))
                });
            chart.draw_series(series.points.iter().map(|(cpu, spread)| {
                Circle::new(
                    (f64::from(*cpu) + shift, spread.median.max(low)),
                    3,
                    colour.filled(),
                )
            }))?;
        }
        for level in &figure.levels {
            let colour = *colours.next().unwrap_or(&BLACK);
            chart
                .draw_series(LineSeries::new(
                    [(-0.5, level.us), (x_end, level.us)],
                    colour.stroke_width(2),
                ))?
                .label(level.name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 24, y)], colour.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    };
    plot().map_err(|error| anyhow!("drawing {}: {error}", path.display()))
}

/// Per CPU index, the spread of `values(run)[cpu]` over the runs.
fn per_cpu<'a, I>(runs: I) -> Vec<(u32, Spread)>
where
    I: Iterator<Item = &'a [Option<u64>]> + Clone,
{
    let cpus = runs.clone().map(<[_]>::len).max().unwrap_or(0);
    (0..cpus)
        .filter_map(|cpu| {
            let samples: Vec<u64> = runs
                .clone()
                .filter_map(|run| run.get(cpu).copied().flatten())
                .collect();
            Some((u32::try_from(cpu).ok()?, Spread::of_u64(&samples)?))
        })
        .collect()
}

/// `bench shootdown --plot`: each CPU's NMI latency and check-in time,
/// and the whole shootdown.
pub fn shootdown_figure(result: &ShootdownResult) -> Figure {
    let latency = per_cpu(result.samples.iter().map(|s| s.nmi_latency_us.as_slice()));
    let checkin = per_cpu(result.samples.iter().map(|s| s.checkin_us.as_slice()));
    let mut series = vec![PerCpu {
        name: "NMI latency: first NMI sent to the CPU taking it".to_owned(),
        points: latency,
    }];
    if !checkin.is_empty() {
        series.push(PerCpu {
            name: "check-in: first NMI sent to the coordinator seeing it (it polls once all NMIs are sent)"
                .to_owned(),
            points: checkin,
        });
    }
    Figure {
        title: format!(
            "hv crash shootdown: -smp {}, {}, {} runs",
            result.smp,
            result.emulator,
            result.samples.len()
        ),
        x_label: "CPU index (the coordinator has none)".to_owned(),
        series,
        levels: result
            .shootdown()
            .map(|s| Level {
                name: format!(
                    "shootdown, every CPU checked in (median {:.0} us)",
                    s.median
                ),
                us: s.median,
            })
            .into_iter()
            .collect(),
    }
}

/// `bench bringup --plot`: each AP's bring-up time in hv, and the whole
/// bring-up of hv and of Linux.
pub fn bringup_figure(result: &BenchResult) -> Figure {
    let aps = per_cpu(result.hv_ap_us.iter().map(Vec::as_slice));
    let level = |name: &str, samples: &[u64]| {
        Spread::of_u64(samples).map(|s| Level {
            name: format!("{name}: last AP online (median {:.0} us)", s.median),
            us: s.median,
        })
    };
    let linux_words = if result.linux_append.is_empty() {
        String::new()
    } else {
        format!(", Linux with {}", result.linux_append.join(" "))
    };
    Figure {
        title: format!(
            "AP bring-up, first INIT to AP online: -smp {}, {}, {} runs each{linux_words}",
            result.smp,
            result.emulator,
            result.hv_us.len()
        ),
        x_label: "AP (CPU index)".to_owned(),
        series: vec![PerCpu {
            name: "hv, each AP".to_owned(),
            points: aps,
        }],
        levels: [
            level("hv", &result.hv_us),
            level("Linux 6.1", &result.linux_us),
        ]
        .into_iter()
        .flatten()
        .collect(),
    }
}

/// Per CPU index, when each AP came online counted from the first INIT:
/// hv reports when each CPU came online (`cpus.online_at_us`) and
/// `bringup_us`, the time to the last AP; the first INIT was sent
/// `bringup_us` before the last AP came online. The boot CPU (index 0) and
/// CPUs not online have none.
pub fn ap_times(online_at_us: &[Option<u64>], bringup_us: u64) -> Vec<Option<u64>> {
    let last = online_at_us.iter().skip(1).flatten().max().copied();
    let Some(start) = last.and_then(|last| last.checked_sub(bringup_us)) else {
        return vec![None; online_at_us.len()];
    };
    online_at_us
        .iter()
        .enumerate()
        .map(|(cpu, at)| match (cpu, at) {
            (0, _) => None,
            (_, at) => at.and_then(|at| at.checked_sub(start)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::shootdown::ShootdownSample;
    use crate::crash::CrashSpec;

    #[test]
    fn ap_times_count_from_the_first_init() {
        // As hv reported them at -smp 8: the last AP 2346 us after the
        // first INIT.
        let online = [
            Some(180_117),
            Some(184_294),
            Some(184_188),
            None,
            Some(183_957),
        ];
        assert_eq!(
            ap_times(&online, 2346),
            [None, Some(2346), Some(2240), None, Some(2009)]
        );
        assert_eq!(ap_times(&[Some(5)], 1), [None]);
        assert_eq!(ap_times(&[Some(0), Some(3)], 10), [None, None]);
    }

    fn shootdown_result() -> ShootdownResult {
        let sample =
            |latency: Vec<Option<u64>>, checkin: Vec<Option<u64>>, total| ShootdownSample {
                spec: CrashSpec::parse("cpu:0,after_ms:5").unwrap(),
                shootdown_us: total,
                nmi_latency_us: latency,
                nmi_in_guest: Vec::new(),
                checkin_us: checkin,
            };
        ShootdownResult {
            smp: 4,
            memory_mib: 512,
            emulator: "qemu-tcg".into(),
            seed: 1,
            cpu: Some(0),
            samples: vec![
                sample(
                    vec![None, Some(100), Some(200), Some(300)],
                    vec![None, Some(150), Some(260), Some(380)],
                    400,
                ),
                sample(
                    vec![None, Some(120), Some(220), Some(5000)],
                    vec![None, Some(170), Some(280), Some(5100)],
                    5200,
                ),
            ],
        }
    }

    #[test]
    fn the_shootdown_figure_has_both_per_cpu_series_and_the_total() {
        let figure = shootdown_figure(&shootdown_result());
        assert_eq!(figure.series.len(), 2);
        let latency = &figure.series[0].points;
        assert_eq!(latency.len(), 3, "the coordinator has no point");
        assert_eq!(latency[0].0, 1);
        assert_eq!(latency[2].1.max, 5000.0);
        assert_eq!(figure.series[1].points[1].1.median, 270.0);
        assert_eq!(figure.levels.len(), 1);
        assert_eq!(figure.levels[0].us, 2800.0);
        assert_eq!(figure.y_range(), Some((100.0, 10f64.powf(4.3))));
    }

    #[test]
    fn a_figure_is_written_as_svg() {
        let path = std::env::temp_dir().join(format!("xtask-plot-{}.svg", std::process::id()));
        write_svg(&shootdown_figure(&shootdown_result()), &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..100.min(svg.len())]);
        assert!(svg.contains("hv crash shootdown: -smp 4, qemu-tcg, 2 runs"));
        assert!(svg.contains("NMI latency"));
        assert!(svg.contains("check-in"));
        // Three CPUs, two series: six median points.
        assert_eq!(svg.matches("<circle").count(), 6);
    }

    #[test]
    fn nothing_to_draw_is_an_error() {
        let mut result = shootdown_result();
        result.samples.clear();
        let path = std::env::temp_dir().join("xtask-plot-empty.svg");
        assert!(write_svg(&shootdown_figure(&result), &path).is_err());
    }
}
