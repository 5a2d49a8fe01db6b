//! The step model against measurement on this machine (issue 7, item 4), recomputed from the files of one recorded
//! run in `tests/data` (how they were made: docs/planner.md). Nothing is measured here: the test checks that the
//! model, calibrated by that run's `bench kernels` and `bench transport`, still predicts that run's `bench e2e`
//! decode tokens/s of `switchyard up` (small preset) within 20% for each cluster shape (the median of the repeats).

use std::path::PathBuf;

use switchyard_planner::{calibrate, check_against, HardwareProfile, ModelSpec, PlanRequest, Planner};

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        0.5 * (values[n / 2 - 1] + values[n / 2])
    }
}

#[test]
fn predicted_decode_rate_of_up_is_within_20_percent_of_the_recorded_run() {
    let mut cpu = HardwareProfile::named("cpu").expect("profile");
    calibrate::apply_file(&mut cpu, &data("kernels.json")).expect("kernels calibration");
    calibrate::apply_file(&mut cpu, &data("transport.json")).expect("transport calibration");
    let model = ModelSpec::resolve("small").expect("preset");
    for file in ["e2e-1.json", "e2e-4.json"] {
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(data(file)).expect("read")).expect("json");
        // The run's prompts are 16 tokens (bench e2e's default) and it generated `tokens` each.
        let generated = json["tokens"].as_u64().expect("tokens");
        let request = PlanRequest { input_len: 16, output_len: generated, ..PlanRequest::default() };
        let planner = Planner::new(&model, &cpu, request).expect("planner");
        let rows = check_against(&planner, &json).expect("rows");
        let mut batches: Vec<u64> = rows.iter().map(|r| r.batch).collect();
        batches.dedup();
        for batch in batches {
            let of_batch: Vec<_> = rows.iter().filter(|r| r.batch == batch).collect();
            let measured = median(of_batch.iter().map(|r| r.measured_tokens_per_s).collect());
            let predicted = of_batch[0].predicted_tokens_per_s;
            let error = predicted / measured - 1.0;
            assert!(
                error.abs() < 0.20,
                "{file}, batch {batch}: predicted {predicted:.1} tok/s, measured median {measured:.1} ({:+.1}%)",
                error * 100.0
            );
        }
    }
}
