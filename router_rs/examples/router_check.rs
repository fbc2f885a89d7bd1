//! Quick checks of the router core without criterion, for CI and for comparing builds:
//!   router_check latency [W [M]]  p50/p99 of `select` from raw counts per (W, L, E), JSON lines
//!                                 (ROUTER_CHECK_REPEAT=N times as many iterations, for `perf`);
//!                                 W outside the sweep runs at (48, 128); M: certified (Auto),
//!                                 exact, int8 or int16
//!                                 `select` takes loads i mod 5; the receipt's decision (the load
//!                                 balancer's call, then a release) sees every load equal
//!   router_check marginal         p50/p99 of the marginal policy's acquire + release per W, with
//!                                 8 requests already running on each decoder, JSON lines
//!   router_check agreement N      certified vs exact decisions on N random cases; prints the
//!                                 number that differ (must be 0) and exits 1 if any does
use eldr_router::policy::{ExpertGeometry, StepCost};
use eldr_router::{Centroids, LocalityModel, Precision, Router, SignatureSpec, Signal};
use std::hint::black_box;
use std::time::Instant;

fn prompt_counts(rng: &mut fastrand::Rng, layers: usize, experts: usize, k: usize, tokens: usize) -> Vec<i32> {
    let mut counts = vec![0i32; layers * experts];
    for l in 0..layers {
        for _ in 0..tokens {
            let start = rng.usize(..experts);
            for j in 0..k {
                counts[l * experts + (start + j * 7) % experts] += 1;
            }
        }
    }
    counts
}

fn latency(only: Option<usize>, mode: Option<&str>) {
    // More iterations for a profiler to sample (ROUTER_CHECK_REPEAT=50 runs 50 times as many).
    let repeat: usize = std::env::var("ROUTER_CHECK_REPEAT").ok().and_then(|v| v.parse().ok()).unwrap_or(1).max(1);
    let mut rng = fastrand::Rng::with_seed(42);
    let sweep = [(16, 48, 128), (64, 48, 128), (256, 48, 128), (1024, 48, 128), (1024, 58, 256)];
    let points: Vec<(usize, usize, usize)> = match only {
        // A fleet size outside the sweep runs at (48, 128).
        Some(w) if !sweep.iter().any(|p| p.0 == w) => vec![(w, 48, 128)],
        Some(w) => sweep.into_iter().filter(|p| p.0 == w).collect(),
        None => sweep.to_vec(),
    };
    for (workers, layers, experts) in points {
        let idf: Vec<f32> = (0..layers * experts).map(|_| 0.1 + rng.f32()).collect();
        let spec = SignatureSpec::new(layers, experts, Some(&idf), None).unwrap();
        let dim = spec.dim();
        let data: Vec<f32> = (0..workers * dim).map(|_| rng.f32()).collect();
        let counts = prompt_counts(&mut rng, layers, experts, 8, 128);
        let loads: Vec<i64> = (0..workers as i64).map(|i| i % 5).collect();
        let signal = Signal::Counts { data: &counts, rows: layers, cols: experts };
        let modes = [("certified", Precision::Auto), ("exact", Precision::Exact), ("int8", Precision::Int8), ("int16", Precision::Int16)];
        for (name, precision) in modes {
            // int16 alone is only run when asked for (it is what `certified` runs at small W).
            if name == "int16" && mode != Some("int16") {
                continue;
            }
            if mode.is_some_and(|m| m != name) {
                continue;
            }
            let model = LocalityModel::with_precision(spec.clone(), Centroids::new(&data, workers, dim).unwrap(), precision).unwrap();
            let kernel = model.kernel();
            let router = Router::with_model(model, 0.1, None).unwrap();
            let iters = (2_000_000 / (workers * dim / 64).max(1)).clamp(200, 20_000) * repeat;
            for _ in 0..iters / 10 {
                black_box(router.select(signal, &loads, None).unwrap());
            }
            let mut ns: Vec<u64> = (0..iters)
                .map(|_| {
                    let t = Instant::now();
                    black_box(router.select(black_box(signal), &loads, None).unwrap());
                    t.elapsed().as_nanos() as u64
                })
                .collect();
            // What the load balancer calls: the decision with its receipt, then the release.
            let mut receipt_ns: Vec<u64> = (0..iters)
                .map(|_| {
                    let t = Instant::now();
                    let r = black_box(router.acquire_with_receipt(black_box(signal)).unwrap());
                    let elapsed = t.elapsed().as_nanos() as u64;
                    router.release(r.id).unwrap();
                    elapsed
                })
                .collect();
            let p = |ns: &mut Vec<u64>, q: f64| {
                ns.sort_unstable();
                ns[((ns.len() - 1) as f64 * q) as usize] as f64 / 1e3
            };
            println!(
                "{{\"mode\": \"{name}\", \"kernel\": \"{kernel}\", \"workers\": {workers}, \"layers\": {layers}, \"experts\": {experts}, \"p50_us\": {:.3}, \"p99_us\": {:.3}, \"receipt_p50_us\": {:.3}}}",
                p(&mut ns, 0.5),
                p(&mut ns, 0.99),
                p(&mut receipt_ns, 0.5)
            );
        }
    }
}

fn marginal() {
    let mut rng = fastrand::Rng::with_seed(42);
    let (layers, experts, top_k, running) = (48, 128, 8, 8);
    for workers in [16, 64, 256, 1024] {
        let keys: Vec<String> = (0..workers).map(|k| format!("d{k}")).collect();
        let cost = StepCost { a: 7.7e-3, b: 7.7e-4, c: 1.47e-3 };
        let router = Router::marginal(&keys, cost, Some(ExpertGeometry::new(layers, experts, top_k).unwrap()), 3).unwrap();
        let prompts: Vec<Vec<i32>> = (0..64).map(|_| prompt_counts(&mut rng, layers, experts, top_k, 128)).collect();
        let signal = |i: usize| Signal::Counts { data: &prompts[i % prompts.len()], rows: layers, cols: experts };
        for i in 0..workers * running {
            router.acquire_with_receipt(signal(i)).unwrap();
        }
        let iters = (200_000 / workers).clamp(200, 20_000);
        let mut ns: Vec<u64> = (0..iters)
            .map(|i| {
                let t = Instant::now();
                let r = black_box(router.acquire_with_receipt(black_box(signal(i))).unwrap());
                router.release_ticket(r.id, r.ticket.unwrap()).unwrap();
                t.elapsed().as_nanos() as u64
            })
            .collect();
        ns.sort_unstable();
        let p = |q: f64| ns[((ns.len() - 1) as f64 * q) as usize] as f64 / 1e3;
        println!(
            "{{\"mode\": \"marginal\", \"workers\": {workers}, \"layers\": {layers}, \"experts\": {experts}, \"top_k\": {top_k}, \"running_per_decoder\": {running}, \"p50_us\": {:.3}, \"p99_us\": {:.3}}}",
            p(0.5),
            p(0.99)
        );
    }
}

fn agreement(cases: usize) -> usize {
    let mut rng = fastrand::Rng::with_seed(2026);
    let mut differ = 0;
    for _ in 0..cases {
        let layers = rng.usize(1..9);
        let experts = [8, 16, 31, 64, 128, 256][rng.usize(..6)];
        let workers = [1, 2, 3, 8, 16, 64][rng.usize(..6)];
        let idf: Vec<f32> = (0..layers * experts).map(|_| if rng.u8(..10) == 0 { 0.0 } else { 0.05 + 3.0 * rng.f32() }).collect();
        let spec = SignatureSpec::new(layers, experts, Some(&idf), None).unwrap();
        let dim = spec.dim();
        // Centroids near a common direction, so scores crowd the band edge and each other.
        let base: Vec<f32> = (0..dim).map(|_| rng.f32()).collect();
        let spread = [1e-6f32, 1e-3, 0.05, 1.0][rng.usize(..4)];
        let mut data: Vec<f32> = (0..workers * dim).map(|i| base[i % dim] + spread * rng.f32()).collect();
        if workers > 1 && rng.bool() {
            let (a, b) = data.split_at_mut(dim);
            b[..dim].copy_from_slice(a); // an exact tie
        }
        let tokens = [1, 16, 128, 2048, 100_000][rng.usize(..5)];
        let counts = prompt_counts(&mut rng, layers, experts, 8.min(experts), tokens);
        let loads: Vec<i64> = (0..workers).map(|_| rng.i64(0..3)).collect();
        let healthy: Vec<bool> = (0..workers).map(|k| k == 0 || rng.u8(..8) != 0).collect();
        let tau = [0.0, 1e-6, 1e-3, 0.05, 0.1, 0.3][rng.usize(..6)];
        let guard = [None, Some(0), Some(2)][rng.usize(..3)];
        let signal = Signal::Counts { data: &counts, rows: layers, cols: experts };
        let centroids = Centroids::new(&data, workers, dim).unwrap();
        let decide = |p| {
            let model = LocalityModel::with_precision(spec.clone(), centroids.clone(), p).unwrap();
            Router::with_model(model, tau, guard).unwrap().select(signal, &loads, Some(&healthy)).unwrap()
        };
        let want = decide(Precision::Exact);
        differ += [Precision::Int16, Precision::Int8].iter().filter(|&&p| decide(p) != want).count();
    }
    differ
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("latency") => latency(args.get(2).and_then(|v| v.parse().ok()), args.get(3).map(String::as_str)),
        Some("marginal") => marginal(),
        Some("agreement") => {
            let n = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(100_000);
            let differ = agreement(n);
            println!("{{\"cases\": {n}, \"kernels\": [\"int16\", \"int8\"], \"differing_decisions\": {differ}}}");
            if differ > 0 {
                std::process::exit(1);
            }
        }
        _ => {
            eprintln!("usage: router_check latency [W [certified|exact|int8|int16]] | marginal | agreement [N]");
            std::process::exit(2);
        }
    }
}
