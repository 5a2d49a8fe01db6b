//! `switchyard plan --plot`: the SVG of throughput and cost against expert workers is written, well-formed, and
//! drawn from the same search results the table lists; a bad path is refused with the path named.

use switchyard_planner::{plot, HardwareProfile, ModelSpec, Plan, PlanError, PlanRequest, Planner, Shortfall, Target};
use switchyard_simulator::plot::Mark;

/// Maverick FP8 on H100s at 20 requests/s within a 25 ms TPOT: few expert GPUs do not hold the experts, some more
/// hold them but miss the TPOT SLO, more meet it.
fn request() -> PlanRequest {
    PlanRequest {
        target: Target::Rate(20.0),
        slo_tpot_s: Some(0.025),
        slo_ttft_s: Some(1.0),
        max_devices: 64,
        ..PlanRequest::default()
    }
}

fn plan() -> (ModelSpec, HardwareProfile, Plan) {
    let model = ModelSpec::resolve("maverick-fp8").expect("preset");
    let hardware = HardwareProfile::named("h100-80g").expect("profile");
    let plan = switchyard_planner::plan(&model, &hardware, request()).expect("plan");
    (model, hardware, plan)
}

/// Checks that `svg` is well-formed XML as far as a plot needs: one root element, every element closed in order,
/// attribute values quoted, no stray `<` or `&` in text.
fn assert_well_formed(svg: &str) {
    let mut open: Vec<&str> = Vec::new();
    let mut rest = svg.trim();
    let mut roots = 0;
    while let Some(start) = rest.find('<') {
        let text = &rest[..start];
        assert!(!text.contains('>'), "stray '>' in text {text:?}");
        for (i, _) in text.match_indices('&') {
            let entity = &text[i..text[i..].find(';').map_or(text.len(), |e| i + e + 1)];
            assert!(["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"].contains(&entity), "bad entity in {text:?}");
        }
        let end = start + rest[start..].find('>').expect("unterminated tag");
        let tag = &rest[start + 1..end];
        rest = &rest[end + 1..];
        if tag.starts_with('?') || tag.starts_with('!') {
            continue;
        }
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(open.pop(), Some(name.trim()), "closing </{name}> out of order");
            continue;
        }
        let self_closing = tag.ends_with('/');
        let body = tag.trim_end_matches('/');
        let name = body.split_whitespace().next().expect("tag name");
        // Attributes: name="value" pairs, values quoted.
        let mut attributes = body[name.len()..].trim();
        while !attributes.is_empty() {
            let eq = attributes.find('=').unwrap_or_else(|| panic!("attribute without value in <{tag}>"));
            let after = attributes[eq + 1..].trim_start();
            let quote = after.chars().next().expect("value");
            assert!(quote == '"' || quote == '\'', "unquoted attribute in <{tag}>");
            let close = after[1..].find(quote).expect("unterminated attribute value");
            assert!(!after[1..1 + close].contains('<'), "'<' in an attribute of <{tag}>");
            attributes = after[close + 2..].trim_start();
        }
        if open.is_empty() {
            roots += 1;
        }
        if !self_closing {
            open.push(name);
        }
    }
    assert!(rest.trim().is_empty(), "text after the root element");
    assert!(open.is_empty(), "unclosed elements {open:?}");
    assert_eq!(roots, 1, "one root element");
}

#[test]
fn the_plot_is_written_as_well_formed_svg() {
    let (_, _, plan) = plan();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("plan.svg");
    plot::write_svg(&path, &plan).expect("draws");
    let svg = std::fs::read_to_string(&path).expect("written");
    assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
    assert_well_formed(&svg);
    let chosen = &plan.result.chosen;
    for text in [
        "output tokens/s".to_string(),
        "GPU-hours per million output tokens".into(),
        "does not fit in memory".into(),
        "misses the load or SLOs".into(),
        "at its capacity".into(),
        // The chosen plan's legend entry carries its numbers.
        format!(
            "chosen: {} attention + {} expert GPUs, {:.0} tok/s",
            chosen.shape.attention_workers, chosen.shape.expert_workers, chosen.output_tokens_per_s
        ),
    ] {
        assert!(svg.contains(&text), "missing {text:?}");
    }
}

#[test]
fn the_plotted_points_are_the_search_results_the_table_lists() {
    let (model, hardware, plan) = plan();
    let options = &plan.result.by_expert_workers;
    // Every kind of point is there: the request makes sure of it.
    for kind in [None, Some(Shortfall::MissesTarget), Some(Shortfall::DoesNotFit)] {
        assert!(options.iter().any(|o| o.shortfall() == kind), "no option with {kind:?}");
    }
    let chosen = &plan.result.chosen;
    let chosen_options: Vec<_> = options.iter().filter(|o| o.chosen).collect();
    assert_eq!(chosen_options.len(), 1);
    assert_eq!(chosen_options[0].shape, Some(chosen.shape));
    assert_eq!(chosen_options[0].predicted.map(|p| p.output_tokens_per_s), Some(chosen.output_tokens_per_s));

    // The options are the planner's own evaluations of their shapes: evaluating again gives the same numbers.
    let planner = Planner::new(&model, &hardware, request()).expect("planner");
    for option in options.iter().filter(|o| o.shortfall().is_none()) {
        let again = planner.evaluate(option.shape.expect("a shape meeting the request"));
        assert!(again.feasible);
        let predicted = option.predicted.expect("a prediction");
        assert_eq!(predicted.output_tokens_per_s, again.output_tokens_per_s);
        assert_eq!(
            Some(predicted.device_hours_per_million_output_tokens),
            again.device_hours_per_million_output_tokens()
        );
    }

    // The charts' points are exactly those numbers: no recomputation between the search and the plot.
    let charts = plot::charts(&plan);
    assert_eq!(charts.len(), 2);
    let series = |chart: usize, label: &str| {
        charts[chart].series.iter().find(|s| s.label.starts_with(label)).unwrap_or_else(|| panic!("no {label}"))
    };
    let met = |value: fn(&switchyard_planner::ExpertWorkerOption) -> Option<f64>| -> Vec<(f64, f64)> {
        options
            .iter()
            .filter(|o| o.shortfall().is_none())
            .map(|o| (o.expert_workers as f64, value(o).expect("value")))
            .collect()
    };
    assert_eq!(series(0, "meets the request").points, met(|o| o.predicted.map(|p| p.output_tokens_per_s)));
    assert_eq!(
        series(1, "meets the request").points,
        met(|o| o.predicted.map(|p| p.device_hours_per_million_output_tokens))
    );
    assert_eq!(series(0, "the same shape at its capacity").points, met(|o| o.capacity.map(|p| p.output_tokens_per_s)));
    let ring = series(0, "chosen:");
    assert_eq!(ring.mark, Mark::Rings);
    assert_eq!(ring.points, vec![(chosen.shape.expert_workers as f64, chosen.output_tokens_per_s)]);
    let unfit: Vec<f64> = options
        .iter()
        .filter(|o| o.shortfall() == Some(Shortfall::DoesNotFit))
        .map(|o| o.expert_workers as f64)
        .collect();
    assert_eq!(series(0, "does not fit").points.iter().map(|p| p.0).collect::<Vec<_>>(), unfit);

    // The table prints the same rows.
    let table = plan.to_table();
    for option in options {
        let row = table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(&option.expert_workers.to_string()) && l.starts_with("  "))
            .unwrap_or_else(|| panic!("no row for {} expert workers", option.expert_workers));
        if let Some(tokens) = option.predicted.map(|p| p.output_tokens_per_s) {
            assert!(row.contains(&format!("{tokens:.1}")), "{row}");
        }
        match option.shortfall() {
            Some(Shortfall::DoesNotFit) => assert!(row.contains("does not fit"), "{row}"),
            Some(Shortfall::MissesTarget) => assert!(row.contains("misses"), "{row}"),
            None => {}
        }
    }
}

#[test]
fn a_bad_plot_path_is_refused_naming_it() {
    let (_, _, plan) = plan();
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("no/such/dir/plan.svg");
    let err = plot::write_svg(&missing, &plan).expect_err("no such directory");
    assert!(matches!(err, PlanError::Plot(_)), "{err}");
    let message = err.to_string();
    assert!(message.contains(&missing.display().to_string()) && message.contains("directory"), "{message}");
    let png = dir.path().join("plan.png");
    let message = plot::write_svg(&png, &plan).expect_err("not .svg").to_string();
    assert!(message.contains("plan.png") && message.contains(".svg"), "{message}");
    assert!(!png.exists());
    // A directory where the file should be: the write itself fails, and says so.
    let taken = dir.path().join("taken.svg");
    std::fs::create_dir(&taken).expect("mkdir");
    let message = plot::write_svg(&taken, &plan).expect_err("a directory").to_string();
    assert!(message.contains("taken.svg") && message.contains("cannot write"), "{message}");
}
