use eldr_router::Centroids;
fn main() {
    let (w, d) = (16usize, 6144usize);
    let data: Vec<f32> = (0..w * d).map(|i| (i % 97) as f32 / 97.0 + 0.01).collect();
    let c = Centroids::new(&data, w, d).unwrap();
    let x: Vec<f32> = (0..d).map(|i| (i % 13) as f32).collect();
    let mut out = Vec::new();
    for _ in 0..100 { c.cosines(&x, &mut out); }
    let t = std::time::Instant::now();
    let n = 5000;
    for _ in 0..n { c.cosines(std::hint::black_box(&x), &mut out); }
    println!("cosines {:.2} us", t.elapsed().as_secs_f64() / n as f64 * 1e6);
}
