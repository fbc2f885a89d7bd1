use eldr_router::{Centroids, LocalityModel, Precision, Router, RouterError, SignatureSpec, Signal};
use eldr_router::policy::LocalityBand;

fn eldr(tau: f64) -> Router {
    // Two layers, three experts; worker k's centroid puts its weight on expert k.
    let spec = SignatureSpec::new(2, 3, None, None).unwrap();
    let mut c = vec![0.0f32; 3 * 6];
    for k in 0..3 {
        c[k * 6 + k] = 1.0;
        c[k * 6 + 3 + k] = 1.0;
    }
    Router::with_model(LocalityModel::new(spec, Centroids::new(&c, 3, 6).unwrap()).unwrap(), tau, None).unwrap()
}

fn counts_for(expert: usize) -> [i32; 6] {
    let mut c = [0; 6];
    c[expert] = 5;
    c[3 + expert] = 5;
    c
}

fn sig(c: &[i32]) -> Signal<'_, i32> {
    Signal::Counts { data: c, rows: 2, cols: 3 }
}

#[test]
fn counts_route_to_matching_centroid_and_counters_return_to_zero() {
    let r = eldr(0.0);
    for k in 0..3 {
        assert_eq!(r.acquire(sig(&counts_for(k))).unwrap(), k as u64);
    }
    assert_eq!(r.loads(), vec![1, 1, 1]);
    for k in 0..3 {
        assert_eq!(r.release(k), Ok(true));
    }
    assert_eq!(r.loads(), vec![0, 0, 0]);
    assert_eq!(r.release(0), Err(RouterError::ReleaseUnderflow(0)));
    assert_eq!(r.loads(), vec![0, 0, 0]);
}

#[test]
fn zero_counts_fall_back_to_least_loaded() {
    let r = eldr(0.1);
    r.acquire(sig(&counts_for(0))).unwrap();
    let zero = [0i64; 6];
    let receipt = r.acquire_with_receipt(Signal::Counts { data: &zero, rows: 2, cols: 3 }).unwrap();
    assert_eq!((receipt.worker, receipt.id), (1, 1));
    assert_eq!(receipt.scores, None);
    assert!(receipt.band.is_empty());
}

#[test]
fn unhealthy_workers_are_never_chosen_and_all_unhealthy_is_an_error() {
    let r = eldr(0.0);
    r.set_healthy(0, false).unwrap();
    for _ in 0..10 {
        assert_ne!(r.acquire(sig(&counts_for(0))).unwrap(), 0);
    }
    r.set_healthy(1, false).unwrap();
    r.set_healthy(2, false).unwrap();
    assert_eq!(r.acquire(Signal::<u8>::Absent), Err(RouterError::AllUnhealthy(3)));
    assert_eq!(r.set_healthy(3, true), Err(RouterError::UnknownWorker(3)));
}

#[test]
fn swap_keeps_loads_and_changes_decisions() {
    let r = eldr(0.0);
    let c = counts_for(0);
    assert_eq!(r.acquire(sig(&c)).unwrap(), 0);
    // Rotate centroids: worker 2 now owns expert 0.
    let mut new = vec![0.0f32; 18];
    for k in 0..3 {
        let owner = (k + 2) % 3;
        new[owner * 6 + k] = 1.0;
        new[owner * 6 + 3 + k] = 1.0;
    }
    r.swap_centroids(&new, 3, 6, Some(&[0, 1, 2])).unwrap();
    assert_eq!(r.loads(), vec![1, 0, 0]);
    assert_eq!(r.acquire(sig(&c)).unwrap(), 2);
    assert!(matches!(r.swap_centroids(&new[..12], 2, 6, None), Err(RouterError::Shape { .. })));
    assert!(matches!(r.swap_centroids(&new, 3, 6, Some(&[0, 1])), Err(RouterError::StaleMembership { .. })));
}

#[test]
fn membership_changes_keep_state_and_retain_rows() {
    let r = eldr(0.0);
    let c1 = counts_for(1);
    assert_eq!(r.acquire(sig(&c1)).unwrap(), 1);
    r.report(2, false).unwrap();
    assert_eq!(r.remove(1), Ok(1));
    assert_eq!(r.ids(), vec![0, 2]);
    assert_eq!(r.loads(), vec![0, 0]);
    assert_eq!(r.in_flight(1), 1, "a removed member's request drains as retired");
    assert_eq!(r.release(1), Ok(false));
    assert_eq!(r.in_flight(1), 0);
    assert_eq!(r.members()[1].failures, 1, "the survivors keep their breaker counts");
    // Back under its key: a new id, its old centroid row.
    let id = r.add("1", true).unwrap();
    assert_eq!(id, 3);
    assert_eq!(r.acquire(sig(&c1)).unwrap(), 3);
    assert_eq!(r.loads(), vec![0, 0, 1]);
    // A new key gets the mean direction: the other rows keep their requests.
    let fresh = r.add("new", false).unwrap();
    assert_eq!(r.workers(), 4);
    assert_eq!(r.healthy(), vec![true, true, true, false]);
    assert_eq!(r.add("new", true), Err(RouterError::DuplicateKey("new".into())));
    assert_eq!(r.remove(fresh), Ok(3));
    assert_eq!(r.remove(99), Err(RouterError::UnknownWorker(99)));
}

#[test]
fn a_router_without_centroids_routes_least_loaded_until_loaded() {
    let band = LocalityBand::new(0.0).unwrap();
    let r = Router::locality(&["a", "b"], band, Precision::Auto, 3).unwrap();
    let c = counts_for(1);
    assert_eq!(r.acquire(sig(&c)).unwrap(), 0);
    assert_eq!(r.acquire(sig(&c)).unwrap(), 1);
    assert!(!r.has_centroids());
    let spec = SignatureSpec::new(2, 3, None, None).unwrap();
    let rows = [0.0f32, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0];
    assert!(matches!(r.load_centroids(spec.clone(), &rows[..6], 1, 6), Err(RouterError::Shape { .. })));
    r.load_centroids(spec, &rows, 2, 6).unwrap();
    assert_eq!(r.loads(), vec![1, 1]);
    assert_eq!(r.acquire(sig(&c)).unwrap(), 1);
}

#[test]
fn validation_errors_name_the_argument() {
    let r = eldr(0.1);
    let bad_shape = [1i32; 4];
    let e = r.acquire(Signal::Counts { data: &bad_shape, rows: 2, cols: 2 }).unwrap_err();
    assert!(e.to_string().starts_with("counts:"), "{e}");
    let neg = [1i32, -1, 0, 0, 0, 0];
    let e = r.acquire(sig(&neg)).unwrap_err();
    assert!(matches!(e, RouterError::Negative { arg: "counts", index: 1, .. }), "{e}");
    let nan = [f32::NAN; 6];
    assert!(matches!(r.acquire(Signal::<u8>::Signature(&nan)), Err(RouterError::NonFinite { arg: "signature", .. })));
    assert!(matches!(r.select(Signal::<u8>::Absent, &[0, 0], None), Err(RouterError::Shape { arg: "loads", .. })));
    assert!(matches!(r.select(Signal::<u8>::Absent, &[0, -1, 0], None), Err(RouterError::Negative { arg: "loads", .. })));
    assert_eq!(r.loads(), vec![0, 0, 0], "failed calls must not count");
    assert!(matches!(Router::baseline_n("jsq", 0, 0), Err(RouterError::NoWorkers)));
    assert!(matches!(Router::baseline_n("lru", 2, 0), Err(RouterError::UnknownPolicy(_))));
    let spec = SignatureSpec::new(2, 3, None, None).unwrap();
    let c = Centroids::new(&[1.0; 6], 1, 6).unwrap();
    assert_eq!(
        Router::with_model(LocalityModel::new(spec, c).unwrap(), f64::INFINITY, None).err(),
        Some(RouterError::Tau(f64::INFINITY))
    );
    assert!(matches!(Centroids::new(&[], 0, 6), Err(RouterError::NoWorkers)));
}

#[test]
fn concurrent_acquire_release_balances() {
    let r = std::sync::Arc::new(eldr(0.1));
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let r = r.clone();
            std::thread::spawn(move || {
                for i in 0..2000 {
                    let c = counts_for((t + i) % 3);
                    let w = r.acquire(sig(&c)).unwrap();
                    r.release(w).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(r.loads(), vec![0, 0, 0]);
}

/// A random routing problem: centroids (some rows duplicated, some near-duplicated), IDF,
/// a layer mask, counts (sometimes far above the int16 kernel's limit), loads and health.
struct Case {
    spec: SignatureSpec,
    rows: Vec<f32>,
    workers: usize,
    dim: usize,
    counts: Vec<u32>,
    loads: Vec<i64>,
    healthy: Vec<bool>,
    tau: f64,
    guard: Option<i64>,
}

fn case(rng: &mut fastrand::Rng) -> Case {
    let layers = rng.usize(1..6);
    let experts = [3, 8, 31, 64, 128][rng.usize(..5)];
    let workers = rng.usize(1..40);
    let mask: Vec<bool> = (0..layers).map(|_| rng.f32() < 0.8).collect();
    let mask = if mask.iter().any(|m| *m) { mask } else { vec![true; layers] };
    let idf: Vec<f32> = (0..layers * experts).map(|_| if rng.f32() < 0.1 { 0.0 } else { rng.f32() * 3.0 }).collect();
    let spec = SignatureSpec::new(layers, experts, Some(&idf), Some(&mask)).unwrap();
    let dim = spec.dim();
    let mut rows: Vec<f32> = (0..workers * dim).map(|_| rng.f32() + 1e-3).collect();
    for k in 1..workers {
        match rng.u8(..4) {
            0 => {
                let j = rng.usize(..k);
                let src: Vec<f32> = rows[j * dim..(j + 1) * dim].to_vec();
                rows[k * dim..(k + 1) * dim].copy_from_slice(&src);
            }
            1 => {
                let j = rng.usize(..k);
                for d in 0..dim {
                    rows[k * dim + d] = rows[j * dim + d] * (1.0 + (rng.f32() - 0.5) * 1e-5);
                }
            }
            _ => {}
        }
    }
    let big = rng.u8(..5) == 0;
    let counts: Vec<u32> = (0..layers * experts)
        .map(|_| if rng.f32() < 0.3 { 0 } else if big { rng.u32(..200_000) } else { rng.u32(..300) })
        .collect();
    let loads: Vec<i64> = (0..workers).map(|_| rng.i64(0..3)).collect();
    let mut healthy: Vec<bool> = (0..workers).map(|_| rng.f32() < 0.85).collect();
    if !healthy.iter().any(|h| *h) {
        healthy[0] = true;
    }
    let tau = [0.0, 1e-9, 1e-4, 0.01, 0.1, 0.3, 1.0][rng.usize(..7)];
    let guard = [None, Some(0), Some(1), Some(2)][rng.usize(..4)];
    Case { spec, rows, workers, dim, counts, loads, healthy, tau, guard }
}

#[test]
fn certified_decisions_equal_exact_decisions() {
    let mut rng = fastrand::Rng::with_seed(7);
    for n in 0..3000 {
        let c = case(&mut rng);
        let centroids = Centroids::new(&c.rows, c.workers, c.dim).unwrap();
        let exact = LocalityModel::with_precision(c.spec.clone(), centroids.clone(), Precision::Exact).unwrap();
        let exact = Router::with_model(exact, c.tau, c.guard).unwrap();
        let signal = Signal::Counts { data: &c.counts, rows: c.spec.layers(), cols: c.spec.experts() };
        let want = exact.select(signal, &c.loads, Some(&c.healthy)).unwrap();
        for precision in [Precision::Int16, Precision::Int8] {
            let model = LocalityModel::with_precision(c.spec.clone(), centroids.clone(), precision).unwrap();
            let fast = Router::with_model(model, c.tau, c.guard).unwrap();
            let got = fast.select(signal, &c.loads, Some(&c.healthy)).unwrap();
            assert_eq!(got, want, "case {n} ({precision:?}): certified {got}, exact {want}");
            assert_eq!(fast.scores(signal).unwrap(), exact.scores(signal).unwrap(), "case {n}: exact scores agree");
        }
    }
}

fn marginal() -> Router {
    use eldr_router::policy::{ExpertGeometry, StepCost};
    let geometry = ExpertGeometry::new(2, 3, 1).unwrap();
    Router::marginal(&["a", "b"], StepCost { a: 0.0, b: 0.0, c: 1.0 }, Some(geometry), 3).unwrap()
}

#[test]
fn marginal_keeps_kinds_apart_and_releases_by_ticket() {
    let r = marginal();
    assert_eq!(r.policy(), "marginal");
    let x = r.acquire_with_receipt(sig(&counts_for(0))).unwrap();
    let y = r.acquire_with_receipt(sig(&counts_for(2))).unwrap();
    let x2 = r.acquire_with_receipt(sig(&counts_for(0))).unwrap();
    assert_ne!(x.id, y.id);
    assert_eq!(x2.id, x.id);
    assert_eq!(x2.costs.as_ref().unwrap().len(), 2);
    assert!(matches!(r.acquire(sig(&counts_for(0))), Err(RouterError::Invalid { arg: "acquire", .. })));
    assert!(matches!(r.release(x.id), Err(RouterError::Invalid { arg: "ticket", .. })));
    assert!(matches!(r.hold(x.id), Err(RouterError::Invalid { arg: "hold", .. })));
    assert!(matches!(r.release_ticket(y.id, x.ticket.unwrap()), Err(RouterError::Invalid { arg: "ticket", .. })));
    for rc in [&x, &y, &x2] {
        assert!(r.release_ticket(rc.id, rc.ticket.unwrap()).unwrap());
    }
    assert_eq!(r.loads(), vec![0, 0]);
    assert_eq!(r.expected_distinct().unwrap(), vec![0.0, 0.0]);
}

#[test]
fn marginal_membership_changes_keep_the_other_rows() {
    let r = marginal();
    let x = r.acquire_with_receipt(sig(&counts_for(1))).unwrap();
    let before = r.expected_distinct().unwrap()[x.worker];
    assert!(before > 0.0);
    let c = r.add("c", true).unwrap();
    assert_eq!(r.expected_distinct().unwrap().len(), 3);
    let other = r.ids().into_iter().find(|id| *id != x.id && *id != c).unwrap();
    r.remove(other).unwrap();
    let rows = r.expected_distinct().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[r.ids().iter().position(|id| *id == x.id).unwrap()], before);
    // A request on a removed member still releases (its retired count drops), and says so.
    let y = r.acquire_with_receipt(sig(&counts_for(2))).unwrap();
    r.remove(y.id).unwrap();
    assert!(!r.release_ticket(y.id, y.ticket.unwrap()).unwrap());
    assert!(r.release_ticket(x.id, x.ticket.unwrap()).unwrap());
    assert_eq!(r.loads(), vec![0; r.workers()]);
}

#[test]
fn fixed_point_path_refuses_negative_counts_in_kept_and_dropped_layers() {
    // 4 × 128 = 512 kept dimensions: Auto scores through the int16 kernel.
    let (layers, experts) = (5, 128);
    let mask = [true, false, true, true, true];
    let spec = SignatureSpec::new(layers, experts, None, Some(&mask)).unwrap();
    let mut rng = fastrand::Rng::with_seed(3);
    let rows: Vec<f32> = (0..3 * spec.dim()).map(|_| rng.f32() + 0.01).collect();
    let model = LocalityModel::new(spec, Centroids::new(&rows, 3, 4 * experts).unwrap()).unwrap();
    assert!(model.kernel().starts_with("int16"), "{}", model.kernel());
    let r = Router::with_model(model, 0.1, None).unwrap();
    let good: Vec<i64> = (0..layers * experts).map(|_| rng.i64(0..50)).collect();
    let select = |c: &[i64]| r.select(Signal::Counts { data: c, rows: layers, cols: experts }, &[0, 0, 0], None);
    let want = select(&good).unwrap();
    // Every negative value, in a kept layer (2) or the dropped one (1), names its index; a value
    // below i16's range must not wrap to a positive int16.
    for (index, value) in [(2 * experts + 5, -1i64), (experts + 7, -3), (4 * experts + 127, -65536), (0, i64::MIN)] {
        let mut bad = good.clone();
        bad[index] = value;
        let e = select(&bad).unwrap_err();
        assert!(matches!(e, RouterError::Negative { arg: "counts", index: i, .. } if i == index), "{e}");
    }
    // Counts above i16's range are scaled, not clamped: the decision matches the exact rule.
    let mut huge = good.clone();
    huge[3 * experts + 9] = 5_000_000;
    let exact = Router::with_model(
        LocalityModel::with_precision(r.model().unwrap().spec().clone(), r.model().unwrap().centroids().clone(), Precision::Exact).unwrap(),
        0.1,
        None,
    )
    .unwrap();
    fn sig(c: &[i64]) -> Signal<'_, i64> {
        Signal::Counts { data: c, rows: 5, cols: 128 }
    }
    assert_eq!(select(&huge).unwrap(), exact.select(sig(&huge), &[0, 0, 0], None).unwrap());
    assert_eq!(r.scores(sig(&huge)).unwrap(), exact.scores(sig(&huge)).unwrap());
    assert_eq!(select(&good).unwrap(), want, "the router keeps serving after refusals");
}

#[test]
fn receipt_scores_lie_within_their_stated_error_of_the_exact_scores() {
    let mut rng = fastrand::Rng::with_seed(11);
    for _ in 0..200 {
        let (layers, experts, workers) = (rng.usize(4..10), 128, rng.usize(1..20));
        let spec = SignatureSpec::new(layers, experts, None, None).unwrap();
        let rows: Vec<f32> = (0..workers * spec.dim()).map(|_| rng.f32() + 0.01).collect();
        let counts: Vec<u32> = (0..layers * experts).map(|_| rng.u32(..400)).collect();
        let signal = Signal::Counts { data: &counts, rows: layers, cols: experts };
        for precision in [Precision::Auto, Precision::Exact] {
            let model = LocalityModel::with_precision(spec.clone(), Centroids::new(&rows, workers, spec.dim()).unwrap(), precision).unwrap();
            let r = Router::with_model(model, 0.1, None).unwrap();
            let exact = r.scores(signal).unwrap();
            let receipt = r.acquire_with_receipt(signal).unwrap();
            let (scores, error) = (receipt.scores.unwrap(), receipt.score_error.unwrap());
            if precision == Precision::Exact {
                assert_eq!((&scores, error), (&exact, 0.0));
            }
            for (s, e) in scores.iter().zip(&exact) {
                assert!((s - e).abs() <= error, "{s} vs exact {e}, stated error {error}");
            }
            assert!(r.release(receipt.id).unwrap());
        }
    }
}
