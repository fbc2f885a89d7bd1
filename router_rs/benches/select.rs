//! Raw counts → decision, across fleet sizes and model geometries, for the certified fixed-point
//! kernel and for the exact rule alone.
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use eldr_router::{Centroids, LocalityModel, Precision, Router, SignatureSpec, Signal};
use std::hint::black_box;

const WORKERS: [usize; 5] = [4, 16, 64, 256, 1024];
const GEOMETRIES: [(usize, usize); 4] = [(4, 32), (36, 128), (48, 128), (58, 256)];

/// Counts of a 128-token prompt whose tokens each pick `k` distinct experts per layer.
fn prompt_counts(rng: &mut fastrand::Rng, layers: usize, experts: usize, k: usize) -> Vec<i32> {
    let mut counts = vec![0i32; layers * experts];
    for l in 0..layers {
        for _ in 0..128 {
            let start = rng.usize(..experts);
            for j in 0..k {
                counts[l * experts + (start + j * 7) % experts] += 1;
            }
        }
    }
    counts
}

fn bench_select(c: &mut Criterion) {
    let mut rng = fastrand::Rng::with_seed(42);
    for (name, precision) in [("select_counts", Precision::Auto), ("select_counts_exact", Precision::Exact)] {
        let mut group = c.benchmark_group(name);
        for (layers, experts) in GEOMETRIES {
            let idf: Vec<f32> = (0..layers * experts).map(|_| 0.1 + rng.f32()).collect();
            let spec = SignatureSpec::new(layers, experts, Some(&idf), None).unwrap();
            let counts = prompt_counts(&mut rng, layers, experts, 8.min(experts));
            for workers in WORKERS {
                if precision == Precision::Exact && workers > 64 {
                    continue;
                }
                let dim = spec.dim();
                let data: Vec<f32> = (0..workers * dim).map(|_| rng.f32()).collect();
                let centroids = Centroids::new(&data, workers, dim).unwrap();
                let model = LocalityModel::with_precision(spec.clone(), centroids, precision).unwrap();
                let router = Router::with_model(model, 0.1, None).unwrap();
                let loads: Vec<i64> = (0..workers as i64).map(|i| i % 5).collect();
                let signal = Signal::Counts { data: &counts, rows: layers, cols: experts };
                group.throughput(Throughput::Elements(1));
                group.bench_with_input(BenchmarkId::new(format!("L{layers}xE{experts}"), workers), &workers, |b, _| {
                    b.iter(|| router.select(black_box(signal), black_box(&loads), None).unwrap())
                });
            }
        }
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).warm_up_time(std::time::Duration::from_millis(300))
        .measurement_time(std::time::Duration::from_millis(1200));
    targets = bench_select
}
criterion_main!(benches);
