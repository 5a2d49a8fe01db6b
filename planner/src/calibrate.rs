//! `--calibrate FILE`: replace a profile's rates with what `switchyard bench` measured.
//!
//! - `bench kernels --output-json`: `memory_read_bytes_per_s` becomes the grouped-expert and KV streaming rates, and
//!   times the profile's `dense_stream_share_of_read` the dense weight streaming rate; the FP8 and sgemm GFLOP/s per
//!   token count become the FP8 and dense GEMM rate curves (the geometric mean of the gate/up and down shapes at each
//!   token count). Run it with the token counts the plan will meet (`--tokens 1,2,4,8,16,32,64,256,2048`): between
//!   measured counts the curves interpolate log-linearly.
//! - `bench transport --output-json`: a least-squares line through the gRPC round trips, `p50 = 2 latency +
//!   bytes / bandwidth`, becomes both links.
//!
//! `bench e2e` JSON is a measurement to check predictions against, not a calibration (`switchyard plan
//! --check-against`).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use crate::hardware::{HardwareProfile, Link, RateCurve};
use crate::PlanError;

/// What one calibration file changed, for the report.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    /// The benchmark the file came from.
    pub benchmark: String,
    /// One line per replaced figure.
    pub changes: Vec<String>,
}

/// Reads `path` and applies it to `profile`.
pub fn apply_file(profile: &mut HardwareProfile, path: &Path) -> Result<Applied, PlanError> {
    let bad = |reason: String| PlanError::Calibration { path: path.to_path_buf(), reason };
    let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
    let json: Value = serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let applied = apply(profile, &json).map_err(bad)?;
    profile.sources.push(format!(
        "calibrated from {} ({}): {}",
        path.display(),
        applied.benchmark,
        applied.changes.join("; ")
    ));
    Ok(applied)
}

/// Applies a parsed `switchyard bench` JSON to `profile`.
pub fn apply(profile: &mut HardwareProfile, json: &Value) -> Result<Applied, String> {
    let benchmark = json.get("benchmark").and_then(Value::as_str).ok_or(
        "no \"benchmark\" key: expected the JSON of `switchyard bench kernels` or `bench transport` (--output-json)",
    )?;
    let rows = json.get("rows").and_then(Value::as_array).ok_or("no \"rows\" list")?;
    let changes = match benchmark {
        "kernels" => kernels(profile, json, rows)?,
        "transport" => transport(profile, rows)?,
        "e2e" => {
            return Err("this is `bench e2e` output: a measurement to compare with (--check-against), not a \
                        calibration"
                .to_string())
        }
        other => return Err(format!("benchmark {other:?} carries no rates (use kernels or transport)")),
    };
    Ok(Applied { benchmark: benchmark.to_string(), changes })
}

fn number(row: &Value, key: &str) -> Result<f64, String> {
    row.get(key)
        .and_then(Value::as_f64)
        .filter(|v| v.is_finite() && *v > 0.0)
        .ok_or_else(|| format!("a row has no positive number \"{key}\": {row}"))
}

fn kernels(profile: &mut HardwareProfile, json: &Value, rows: &[Value]) -> Result<Vec<String>, String> {
    let read = number(json, "memory_read_bytes_per_s")?;
    // tokens -> (sum of ln rate, count) for each kernel, so each token count gets the geometric mean over shapes.
    let mut fp8: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    let mut dense: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for row in rows {
        let tokens = number(row, "tokens")? as u64;
        for (map, key) in [(&mut fp8, "fp8_gflops"), (&mut dense, "sgemm_gflops")] {
            let entry = map.entry(tokens).or_insert((0.0, 0.0));
            entry.0 += (number(row, key)? * 1e9).ln();
            entry.1 += 1.0;
        }
    }
    if fp8.is_empty() {
        return Err("the rows list is empty".to_string());
    }
    let curve = |map: &BTreeMap<u64, (f64, f64)>| RateCurve {
        points: map.iter().map(|(&m, &(sum, n))| (m as f64, (sum / n).exp())).collect(),
    };
    let describe =
        |c: &RateCurve| c.points.iter().map(|(m, r)| format!("{m}: {:.1}", r / 1e9)).collect::<Vec<_>>().join(", ");
    let (fp8_curve, dense_curve) = (curve(&fp8), curve(&dense));
    let changes = vec![
        format!(
            "memory read {:.1} GB/s (expert and KV streaming; dense weights at {:.2} of it)",
            read / 1e9,
            profile.dense_stream_share_of_read
        ),
        format!("FP8 GEMM GFLOP/s by tokens {}", describe(&fp8_curve)),
        format!("dense (sgemm) GFLOP/s by tokens {}", describe(&dense_curve)),
    ];
    profile.weight_stream_bytes_per_s = read * profile.dense_stream_share_of_read;
    profile.grouped_stream_bytes_per_s = read;
    profile.kv_read_bytes_per_s = read;
    profile.fp8_flops = fp8_curve.points.last().map_or(profile.fp8_flops, |p| p.1);
    profile.dense_flops = dense_curve.points.last().map_or(profile.dense_flops, |p| p.1);
    profile.fp8_curve = Some(fp8_curve);
    profile.dense_curve = Some(dense_curve);
    Ok(changes)
}

fn transport(profile: &mut HardwareProfile, rows: &[Value]) -> Result<Vec<String>, String> {
    let mut points = Vec::with_capacity(rows.len());
    for row in rows {
        points.push((number(row, "bytes_per_round_trip")?, number(row, "grpc_p50_us")? * 1e-6));
    }
    if points.len() < 2 {
        return Err("at least two rows (two message sizes) are needed to separate latency from bandwidth".into());
    }
    let n = points.len() as f64;
    let (mean_x, mean_y) = (points.iter().map(|p| p.0).sum::<f64>() / n, points.iter().map(|p| p.1).sum::<f64>() / n);
    let sxx: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    if sxx <= 0.0 || sxy <= 0.0 {
        return Err("the rows do not show time growing with bytes; cannot fit a bandwidth".into());
    }
    let seconds_per_byte = sxy / sxx;
    // A round trip carries two messages; a negative intercept (noise) means no measurable fixed cost.
    let latency = ((mean_y - seconds_per_byte * mean_x) / 2.0).max(0.0);
    let link = Link { bytes_per_s: 1.0 / seconds_per_byte, latency_s: latency };
    profile.intra_node = link;
    profile.inter_node = link;
    Ok(vec![format!(
        "link {:.2} GB/s, {:.0} us one way (least squares over {} gRPC round trips)",
        link.bytes_per_s / 1e9,
        link.latency_s * 1e6,
        points.len()
    )])
}
