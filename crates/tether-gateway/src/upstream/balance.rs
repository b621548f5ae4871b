//! Choosing an upstream's endpoint for a request: the weighted round-robin order, and the
//! in-flight counts that `least_requests` compares.

use prometheus_client::metrics::gauge::Gauge;

/// The order in which endpoints with `weights` take their turns: smooth weighted round robin
/// (nginx's), so that an endpoint of weight 3 beside one of weight 1 gets `a a b a`, not
/// `a a a b`. One turn per unit of weight; `None` when every weight is 1 (plain rotation).
pub fn schedule(weights: &[u32]) -> Option<Box<[u32]>> {
    if weights.iter().all(|&w| w == 1) {
        return None;
    }
    let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
    let mut current = vec![0i64; weights.len()];
    let mut order = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        let mut best = 0;
        for (i, &w) in weights.iter().enumerate() {
            current[i] += i64::from(w);
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        order.push(u32::try_from(best).unwrap_or(0));
    }
    Some(order.into_boxed_slice())
}

/// Requests in flight to one endpoint, over every worker and configuration generation: the
/// `tether_upstream_endpoint_in_flight` gauge itself, so what is compared is what is shown.
#[derive(Debug, Clone)]
pub struct Load(Gauge);

impl Load {
    /// A count kept in `gauge`.
    pub fn new(gauge: Gauge) -> Load {
        Load(gauge)
    }

    /// Requests in flight now.
    pub fn get(&self) -> u64 {
        u64::try_from(self.0.get()).unwrap_or(0)
    }

    /// Counts one more request until the returned guard is dropped.
    pub fn hold(&self) -> InFlight {
        self.0.inc();
        InFlight(self.0.clone())
    }
}

/// One request counted in its endpoint's [`Load`] while it lives.
#[derive(Debug)]
pub struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Whether an endpoint with `load` requests in flight and weight `weight` is less loaded than
/// one with `other_load` and `other_weight`: `load / weight < other_load / other_weight`,
/// compared without division (nginx's `least_conn` rule). Idle endpoints tie, so the weighted
/// turns decide between them.
pub fn lighter(load: u64, weight: u32, other_load: u64, other_weight: u32) -> bool {
    u128::from(load) * u128::from(other_weight) < u128::from(other_load) * u128::from(weight)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turns(weights: &[u32]) -> Vec<u32> {
        schedule(weights).map(|s| s.to_vec()).unwrap_or_default()
    }

    #[test]
    fn equal_weights_need_no_schedule() {
        assert!(schedule(&[1, 1, 1]).is_none());
        assert!(schedule(&[1]).is_none());
    }

    #[test]
    fn turns_follow_the_weights_and_are_spread() {
        assert_eq!(turns(&[3, 1]), [0, 0, 1, 0]);
        assert_eq!(turns(&[1, 2]), [1, 0, 1]);
        // nginx's own example: a b a c a b a.
        assert_eq!(turns(&[5, 1, 1]), [0, 0, 1, 0, 2, 0, 0]);
        let t = turns(&[2, 3, 5]);
        assert_eq!(t.len(), 10);
        for (i, w) in [2, 3, 5].into_iter().enumerate() {
            assert_eq!(t.iter().filter(|&&n| n as usize == i).count(), w);
        }
        // The heaviest never takes more than two turns in a row here.
        assert!(!t.windows(3).any(|w| w.iter().all(|&n| n == 2)), "{t:?}");
    }

    #[test]
    fn lighter_compares_load_for_the_weight() {
        assert!(lighter(0, 1, 1, 1));
        assert!(!lighter(1, 1, 1, 1));
        // Idle endpoints tie whatever their weights.
        assert!(!lighter(0, 3, 0, 1));
        assert!(!lighter(0, 1, 0, 3));
        // Two in flight of a weight 3 is lighter than one of a weight 1.
        assert!(lighter(2, 3, 1, 1));
        assert!(!lighter(3, 3, 1, 1));
    }

    #[test]
    fn a_hold_counts_until_dropped() {
        let load = Load::new(Gauge::default());
        let a = load.hold();
        let b = load.hold();
        assert_eq!(load.get(), 2);
        drop(a);
        assert_eq!(load.get(), 1);
        drop(b);
        assert_eq!(load.get(), 0);
    }
}
