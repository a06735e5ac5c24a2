//! How many lanes each relay should hold: the same answer on every relay
//! that sees the same members, so shares never overlap and always add up.

/// The fair share of `lanes` for the member at `index` (0-based, in the
/// order every relay reads the live members) of `members`: an even split,
/// the first `lanes % members` members taking one extra lane.
pub fn fair_share(lanes: usize, members: usize, index: usize) -> usize {
    if members == 0 {
        return lanes;
    }
    lanes / members + usize::from(index < lanes % members)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up_and_differ_by_at_most_one() {
        for lanes in 1..=64 {
            for members in 1..=10 {
                let shares: Vec<usize> = (0..members).map(|i| fair_share(lanes, members, i)).collect();
                assert_eq!(shares.iter().sum::<usize>(), lanes, "{lanes} lanes, {members} members");
                let (min, max) = (shares.iter().min().unwrap(), shares.iter().max().unwrap());
                assert!(max - min <= 1, "{shares:?}");
            }
        }
    }

    #[test]
    fn more_relays_than_lanes_leaves_some_standing_by() {
        assert_eq!((0..3).map(|i| fair_share(2, 3, i)).collect::<Vec<_>>(), vec![1, 1, 0]);
    }

    #[test]
    fn a_lone_relay_takes_every_lane() {
        assert_eq!(fair_share(32, 1, 0), 32);
        assert_eq!(fair_share(32, 0, 0), 32);
    }
}
