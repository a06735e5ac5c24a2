//! Measures the broker's own produce->consume latency (no relay, no
//! database), so live-latency numbers can be read against it.
//! `cargo run --release --example latency_probe -- BOOTSTRAP [linger_ms]`

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bootstrap = args.get(1).cloned().unwrap_or_else(|| "127.0.0.1:9092".into());
    let linger = args.get(2).cloned().unwrap_or_else(|| "5".into());
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", &linger)
        .create()
        .unwrap();
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", "probe")
        .set("fetch.wait.max.ms", "5")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..8 {
        tpl.add_partition_offset("probe", p, Offset::End).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let handle = std::thread::spawn(move || {
        let mut lat = Vec::new();
        let until = Instant::now() + Duration::from_secs(8);
        while Instant::now() < until {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) {
                let sent: i64 = std::str::from_utf8(m.payload().unwrap()).unwrap().parse().unwrap();
                lat.push((now_us() - sent) as f64 / 1000.0);
            }
        }
        lat
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let mut ack = Vec::new();
    let start = Instant::now();
    let mut i = 0u64;
    while start.elapsed() < Duration::from_secs(5) {
        let sent = now_us();
        let payload = sent.to_string();
        let key = format!("k{}", i % 100);
        let d = producer.send_result(FutureRecord::to("probe").key(&key).payload(&payload)).unwrap();
        tokio::spawn(async move { d.await.ok() });
        if i % 50 == 0 {
            let t = Instant::now();
            let d2 = producer.send_result(FutureRecord::to("probe").key(&key).payload(&now_us().to_string())).unwrap();
            d2.await.unwrap().unwrap();
            ack.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        i += 1;
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let mut lat = handle.join().unwrap();
    lat.sort_by(|a, b| a.total_cmp(b));
    ack.sort_by(|a, b| a.total_cmp(b));
    let p = |v: &Vec<f64>, q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    println!("produce->consume: n={} p50 {:.1} ms p99 {:.1} ms", lat.len(), p(&lat, 0.5), p(&lat, 0.99));
    println!("produce->ack:     n={} p50 {:.1} ms p99 {:.1} ms", ack.len(), p(&ack, 0.5), p(&ack, 0.99));
}
