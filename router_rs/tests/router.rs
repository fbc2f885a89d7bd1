use eldr_router::{Centroids, LocalityModel, Router, RouterError, SignatureSpec, Signal};

fn eldr(tau: f64) -> Router {
    // Two layers, three experts; worker k's centroid puts its weight on expert k.
    let spec = SignatureSpec::new(2, 3, None, None).unwrap();
    let mut c = vec![0.0f32; 3 * 6];
    for k in 0..3 {
        c[k * 6 + k] = 1.0;
        c[k * 6 + 3 + k] = 1.0;
    }
    Router::locality(LocalityModel::new(spec, Centroids::new(&c, 3, 6).unwrap()).unwrap(), tau).unwrap()
}

fn counts_for(expert: usize) -> [i32; 6] {
    let mut c = [0; 6];
    c[expert] = 5;
    c[3 + expert] = 5;
    c
}

#[test]
fn counts_route_to_matching_centroid_and_counters_return_to_zero() {
    let r = eldr(0.0);
    for k in 0..3 {
        let c = counts_for(k);
        assert_eq!(r.acquire(Signal::Counts { data: &c, rows: 2, cols: 3 }).unwrap(), k);
    }
    assert_eq!(r.loads(), vec![1, 1, 1]);
    for k in 0..3 {
        r.release(k).unwrap();
    }
    assert_eq!(r.loads(), vec![0, 0, 0]);
    assert_eq!(r.release(0), Err(RouterError::ReleaseUnderflow(0)));
    assert_eq!(r.loads(), vec![0, 0, 0]);
}

#[test]
fn zero_counts_fall_back_to_least_loaded() {
    let r = eldr(0.1);
    let c1 = counts_for(0);
    r.acquire(Signal::Counts { data: &c1, rows: 2, cols: 3 }).unwrap();
    let zero = [0i64; 6];
    let receipt = r.acquire_with_receipt(Signal::Counts { data: &zero, rows: 2, cols: 3 }).unwrap();
    assert_eq!(receipt.worker, 1);
    assert_eq!(receipt.scores, None);
    assert!(receipt.band.is_empty());
}

#[test]
fn unhealthy_workers_are_never_chosen_and_all_unhealthy_is_an_error() {
    let r = eldr(0.0);
    r.set_healthy(0, false).unwrap();
    let c = counts_for(0);
    for _ in 0..10 {
        assert_ne!(r.acquire(Signal::Counts { data: &c, rows: 2, cols: 3 }).unwrap(), 0);
    }
    r.set_healthy(1, false).unwrap();
    r.set_healthy(2, false).unwrap();
    assert_eq!(r.acquire(Signal::<u8>::Absent), Err(RouterError::AllUnhealthy(3)));
    assert_eq!(r.set_healthy(3, true), Err(RouterError::WorkerOutOfRange { worker: 3, workers: 3 }));
}

#[test]
fn swap_keeps_loads_and_changes_decisions() {
    let r = eldr(0.0);
    let c = counts_for(0);
    assert_eq!(r.acquire(Signal::Counts { data: &c, rows: 2, cols: 3 }).unwrap(), 0);
    // Rotate centroids: worker 2 now owns expert 0.
    let mut new = vec![0.0f32; 18];
    for k in 0..3 {
        let owner = (k + 2) % 3;
        new[owner * 6 + k] = 1.0;
        new[owner * 6 + 3 + k] = 1.0;
    }
    r.swap_centroids(&new, 3, 6).unwrap();
    assert_eq!(r.loads(), vec![1, 0, 0]);
    assert_eq!(r.acquire(Signal::Counts { data: &c, rows: 2, cols: 3 }).unwrap(), 2);
    assert!(matches!(r.swap_centroids(&new[..12], 2, 6), Err(RouterError::Shape { .. })));
}

#[test]
fn validation_errors_name_the_argument() {
    let r = eldr(0.1);
    let bad_shape = [1i32; 4];
    let e = r.acquire(Signal::Counts { data: &bad_shape, rows: 2, cols: 2 }).unwrap_err();
    assert!(e.to_string().starts_with("counts:"), "{e}");
    let neg = [1i32, -1, 0, 0, 0, 0];
    let e = r.acquire(Signal::Counts { data: &neg, rows: 2, cols: 3 }).unwrap_err();
    assert!(matches!(e, RouterError::Negative { arg: "counts", index: 1, .. }), "{e}");
    let nan = [f32::NAN; 6];
    assert!(matches!(r.acquire(Signal::<u8>::Signature(&nan)), Err(RouterError::NonFinite { arg: "signature", .. })));
    assert!(matches!(r.select(Signal::<u8>::Absent, &[0, 0], None), Err(RouterError::Shape { arg: "loads", .. })));
    assert!(matches!(r.select(Signal::<u8>::Absent, &[0, -1, 0], None), Err(RouterError::Negative { arg: "loads", .. })));
    assert_eq!(r.loads(), vec![0, 0, 0], "failed calls must not count");
    assert!(matches!(Router::baseline("jsq", 0, 0), Err(RouterError::NoWorkers)));
    assert!(matches!(Router::baseline("lru", 2, 0), Err(RouterError::UnknownPolicy(_))));
    let spec = SignatureSpec::new(2, 3, None, None).unwrap();
    let c = Centroids::new(&[1.0; 6], 1, 6).unwrap();
    assert_eq!(Router::locality(LocalityModel::new(spec, c).unwrap(), f64::INFINITY).err(), Some(RouterError::Tau(f64::INFINITY)));
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
                    let w = r.acquire(Signal::Counts { data: &c, rows: 2, cols: 3 }).unwrap();
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

#[test]
fn restored_state_is_what_the_policy_sees() {
    let r = Router::baseline("jsq", 3, 0).unwrap();
    r.restore_state(&[2, 0, 1], &[true, false, true]).unwrap();
    assert_eq!((r.loads(), r.healthy()), (vec![2, 0, 1], vec![true, false, true]));
    assert_eq!(r.acquire(Signal::<u8>::Absent).unwrap(), 2, "least loaded among the healthy");
    r.release(0).unwrap();
    assert_eq!(r.loads(), vec![1, 0, 2]);
    assert!(matches!(r.restore_state(&[0, 0], &[true; 3]), Err(RouterError::Shape { arg: "loads", .. })));
    assert!(matches!(r.restore_state(&[0; 3], &[true; 2]), Err(RouterError::Shape { arg: "healthy", .. })));
    assert!(matches!(r.restore_state(&[0, -1, 0], &[true; 3]), Err(RouterError::Negative { arg: "loads", index: 1, .. })));
    assert_eq!(r.loads(), vec![1, 0, 2], "a refused restore changes nothing");
}
