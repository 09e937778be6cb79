//! Draws a [`Chart`] as SVG with plotters.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::Chart;

const COLORS: [RGBColor; 6] = [
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(90, 90, 90),
];

/// The range of the points along one axis, padded; for a log axis the
/// range stays positive.
fn range(values: impl Iterator<Item = f64>, log: bool) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite() && (!log || *v > 0.0)) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (if log { 1.0 } else { 0.0 }, 1.0);
    }
    if log {
        (lo / 1.5, hi * 1.5)
    } else {
        let pad = ((hi - lo) * 0.08).max(hi.abs() * 0.02).max(1e-9);
        // Non-negative data starts at zero, so ratios and times read true.
        (if lo >= 0.0 { 0.0 } else { lo - pad }, hi + pad)
    }
}

/// Writes `chart` to `path` (SVG).
pub fn draw(chart: &Chart, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (820, 460)).into_drawing_area();
    let x = range(
        chart
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0)),
        chart.log_x,
    );
    let y = range(
        chart
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1)),
        chart.log_y,
    );
    let result = match (chart.log_x, chart.log_y) {
        (false, false) => plot(&root, chart, x.0..x.1, y.0..y.1),
        (true, false) => plot(&root, chart, (x.0..x.1).log_scale(), y.0..y.1),
        (false, true) => plot(&root, chart, x.0..x.1, (y.0..y.1).log_scale()),
        (true, true) => plot(&root, chart, (x.0..x.1).log_scale(), (y.0..y.1).log_scale()),
    };
    result
        .and_then(|()| root.present().map_err(|e| e.to_string()))
        .map_err(|e| anyhow!("cannot draw {}: {e}", path.display()))
}

fn plot<X, Y>(
    root: &DrawingArea<SVGBackend<'_>, Shift>,
    chart: &Chart,
    x: X,
    y: Y,
) -> std::result::Result<(), String>
where
    X: plotters::coord::ranged1d::AsRangedCoord<Value = f64>,
    Y: plotters::coord::ranged1d::AsRangedCoord<Value = f64>,
    X::CoordDescType: plotters::coord::ranged1d::ValueFormatter<f64>,
    Y::CoordDescType: plotters::coord::ranged1d::ValueFormatter<f64>,
{
    let e = |e: &dyn std::fmt::Display| e.to_string();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut ctx = ChartBuilder::on(root)
        .caption(&chart.title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(x, y)
        .map_err(|x| e(&x))?;
    ctx.configure_mesh()
        .x_desc(&chart.x_label)
        .y_desc(&chart.y_label)
        .draw()
        .map_err(|x| e(&x))?;
    for (i, s) in chart.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points = s.points.clone();
        let drawn = if s.points_only {
            ctx.draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 3, color.filled())),
            )
            .map_err(|x| e(&x))?
        } else {
            ctx.draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                .map_err(|x| e(&x))?;
            ctx.draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 3, color.filled())),
            )
            .map_err(|x| e(&x))?
        };
        drawn.label(s.name.clone()).legend(move |(x, y)| {
            PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
        });
    }
    ctx.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|x| e(&x))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Series;

    #[test]
    fn draws_linear_and_log_charts() {
        let dir = std::env::temp_dir().join(format!("understudy-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (log_x, log_y) in [(false, false), (true, true)] {
            let chart = Chart {
                name: "c".into(),
                title: "pause".into(),
                x_label: "pages".into(),
                y_label: "µs".into(),
                log_x,
                log_y,
                series: vec![Series {
                    name: "pause".into(),
                    points: vec![(100.0, 80.0), (1000.0, 700.0), (50_000.0, 28_000.0)],
                    points_only: false,
                }],
            };
            let path = dir.join(format!("c-{log_x}.svg"));
            draw(&chart, &path).unwrap();
            let svg = std::fs::read_to_string(&path).unwrap();
            assert!(svg.starts_with("<svg") && svg.contains("pause"), "{svg}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
