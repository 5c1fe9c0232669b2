//! The per-stage breakdown: each node's `pgrelay_stage_seconds` histograms,
//! scraped before and after a scenario, and what moved in between.

use std::collections::BTreeMap;

use serde::Serialize;

use super::clients::Http;
use super::cluster::BenchCluster;
use crate::metrics::Stage;

/// One node's stage histograms: (stage → bucket bounds and counts, sum).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    nodes: Vec<BTreeMap<String, Histogram>>,
}

#[derive(Debug, Clone, Default)]
struct Histogram {
    /// (upper bound, cumulative count), in increasing bounds; +Inf last.
    buckets: Vec<(f64, f64)>,
    sum: f64,
    count: f64,
}

/// A stage on a node, over one scenario.
#[derive(Debug, Serialize)]
pub struct StageFigures {
    pub node: String,
    pub stage: &'static str,
    pub messages: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

impl Snapshot {
    pub async fn take(cluster: &BenchCluster) -> Self {
        let http = Http::new(2);
        let mut nodes = Vec::new();
        for node in &cluster.nodes {
            let url = format!("http://{}/metrics", node.addr);
            let text = match http.send(hyper::Method::GET, &url, None, None).await {
                Ok((200, body)) => String::from_utf8_lossy(&body).into_owned(),
                _ => String::new(),
            };
            nodes.push(parse(&text));
        }
        Self { nodes }
    }

    /// What moved since `before`, per node and stage (stages with no
    /// messages left out).
    pub fn since(&self, before: &Snapshot, cluster: &BenchCluster) -> Vec<StageFigures> {
        let mut figures = Vec::new();
        for (i, after) in self.nodes.iter().enumerate() {
            let empty = BTreeMap::new();
            let earlier = before.nodes.get(i).unwrap_or(&empty);
            for stage in Stage::ALL {
                let Some(now) = after.get(stage.as_str()) else {
                    continue;
                };
                let then = earlier.get(stage.as_str()).cloned().unwrap_or_default();
                let delta = now.minus(&then);
                if delta.count < 1.0 {
                    continue;
                }
                figures.push(StageFigures {
                    node: cluster.nodes[i].name.clone(),
                    stage: stage.as_str(),
                    messages: delta.count as u64,
                    mean_ms: delta.sum / delta.count * 1000.0,
                    p50_ms: delta.quantile(0.5) * 1000.0,
                    p99_ms: delta.quantile(0.99) * 1000.0,
                });
            }
        }
        figures
    }
}

impl Histogram {
    fn minus(&self, earlier: &Histogram) -> Histogram {
        let buckets = self
            .buckets
            .iter()
            .map(|(le, n)| {
                let before = earlier
                    .buckets
                    .iter()
                    .find(|(b, _)| b == le)
                    .map_or(0.0, |(_, n)| *n);
                (*le, n - before)
            })
            .collect();
        Histogram {
            buckets,
            sum: self.sum - earlier.sum,
            count: self.count - earlier.count,
        }
    }

    /// The q-quantile, interpolated linearly within its bucket.
    fn quantile(&self, q: f64) -> f64 {
        let rank = q * self.count;
        let mut lower = (0.0, 0.0);
        for &(le, cumulative) in &self.buckets {
            if cumulative >= rank {
                if le.is_infinite() {
                    return lower.0;
                }
                let within = cumulative - lower.1;
                let fraction = if within > 0.0 {
                    (rank - lower.1) / within
                } else {
                    1.0
                };
                return lower.0 + (le - lower.0) * fraction;
            }
            lower = (le, cumulative);
        }
        lower.0
    }
}

/// The `pgrelay_stage_seconds` series of a Prometheus text exposition.
fn parse(text: &str) -> BTreeMap<String, Histogram> {
    let mut stages: BTreeMap<String, Histogram> = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(crate::metrics::STAGE) else {
            continue;
        };
        let Some((series, value)) = rest.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (kind, labels) = series.split_once('{').unwrap_or((series, ""));
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|l| l.trim_end_matches('}').strip_prefix(&format!("{name}=\"")))
                .map(|v| v.trim_end_matches('"').to_owned())
        };
        let Some(stage) = label("stage") else {
            continue;
        };
        let histogram = stages.entry(stage).or_default();
        match kind {
            "_bucket" => {
                let le = match label("le").as_deref() {
                    Some("+Inf") => f64::INFINITY,
                    Some(le) => le.parse().unwrap_or(f64::INFINITY),
                    None => continue,
                };
                histogram.buckets.push((le, value));
            }
            "_sum" => histogram.sum = value,
            "_count" => histogram.count = value,
            _ => {}
        }
    }
    for histogram in stages.values_mut() {
        histogram.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    stages
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_read_and_subtracted() {
        let before = parse(concat!(
            "pgrelay_stage_seconds_bucket{stage=\"commit\",le=\"0.001\"} 1\n",
            "pgrelay_stage_seconds_bucket{stage=\"commit\",le=\"0.002\"} 2\n",
            "pgrelay_stage_seconds_bucket{stage=\"commit\",le=\"+Inf\"} 2\n",
            "pgrelay_stage_seconds_sum{stage=\"commit\"} 0.002\n",
            "pgrelay_stage_seconds_count{stage=\"commit\"} 2\n",
        ));
        let after = parse(concat!(
            "pgrelay_stage_seconds_bucket{stage=\"commit\",le=\"0.001\"} 51\n",
            "pgrelay_stage_seconds_bucket{stage=\"commit\",le=\"0.002\"} 102\n",
            "pgrelay_stage_seconds_bucket{stage=\"commit\",le=\"+Inf\"} 102\n",
            "pgrelay_stage_seconds_sum{stage=\"commit\"} 0.152\n",
            "pgrelay_stage_seconds_count{stage=\"commit\"} 102\n",
            "pgrelay_other_seconds_count{stage=\"commit\"} 7\n",
        ));
        let delta = after["commit"].minus(&before["commit"]);
        assert_eq!(delta.count, 100.0);
        assert!((delta.sum - 0.15).abs() < 1e-9);
        // Half are at or below 1 ms: the median is 1 ms.
        assert!((delta.quantile(0.5) - 0.001).abs() < 1e-9);
        assert!(delta.quantile(0.99) > 0.0019 && delta.quantile(0.99) <= 0.002);
    }
}
