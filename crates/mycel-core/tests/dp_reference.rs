//! The privacy accountant against Google's `dp-accounting` (its version and the command that
//! made the figures are in the data file): every epsilon within 10⁻⁹ (the issue asks for 1%),
//! at the same best order.

use std::collections::HashMap;

use mycel_core::dp::Accountant;
use serde_json::Value;

#[test]
fn every_reference_epsilon_is_matched_within_one_percent() {
    let data: Value =
        serde_json::from_str(include_str!("data/dp_reference.json")).expect("reference data");
    assert!(data["source"].as_str().unwrap().contains("dp-accounting"));
    let cases = data["cases"].as_array().unwrap();
    assert!(cases.len() >= 300, "a grid, not a sample");
    let fresh = Accountant::new();
    let mut per_round: HashMap<(u64, u64), Vec<f64>> = HashMap::new();
    let mut worst = (0.0f64, String::new());
    for case in cases {
        let field = |name: &str| case[name].as_f64().unwrap();
        let (q, sigma, delta, reference) =
            (field("q"), field("sigma"), field("delta"), field("epsilon"));
        let steps = case["steps"].as_u64().unwrap();
        let round = per_round
            .entry((q.to_bits(), sigma.to_bits()))
            .or_insert_with(|| fresh.round(q, sigma).unwrap());
        let mut accountant = fresh.clone();
        accountant.add(round, steps);
        let (ours, order) = accountant.epsilon_and_order(delta).unwrap();
        let error = (ours - reference).abs() / reference.max(1e-9);
        let what = format!("q {q} σ {sigma} steps {steps} δ {delta}: {ours} against {reference}");
        // The issue asks for 1%; the same arithmetic gives the same figures far closer.
        assert!(error <= 1e-9, "{what}");
        assert_eq!(order, field("order"), "{what}: the best order");
        if error > worst.0 {
            worst = (error, what);
        }
    }
    eprintln!("largest relative difference {:.2e} ({})", worst.0, worst.1);
}
