//! Job graphs: a job *needs* other jobs, which must succeed before it may run.
//!
//! A [`Dag`] works on node indices; callers keep the names. It is built once per pipeline and
//! answers the questions the scheduler asks of it: in what stages do the jobs fall, which are
//! ready to queue now, and which can never run because something they need did not succeed.

/// A cycle found while building a graph, as node indices: `cycle[0]` needs `cycle[1]`, …, and
/// the last needs `cycle[0]`. It starts at its smallest index, so it is reported the same way
/// every time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("dependency cycle through nodes {0:?}")]
pub struct Cycle(pub Vec<usize>);

/// Where a node stands, as far as the graph is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeStatus {
    /// Not started: waiting for its needs.
    Waiting,
    /// Queued, placed or running.
    InProgress,
    /// Finished successfully: its dependants may run.
    Succeeded,
    /// Finished without success (failed, timed out, cancelled): its dependants never run.
    Unsuccessful,
}

/// A directed acyclic graph of jobs; the edges point from a job to the jobs it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dag {
    needs: Vec<Vec<usize>>,
    dependents: Vec<Vec<usize>>,
    /// Nodes in a topological order (every node after all the nodes it needs).
    order: Vec<usize>,
    /// `stage[i]`: 0 for a node with no needs, else one more than its deepest need.
    stage: Vec<usize>,
}

impl Dag {
    /// Builds the graph where node `i` needs the nodes in `needs[i]`.
    ///
    /// Duplicate edges are merged. An index out of range is a programming error of the caller
    /// (names are resolved to indices before this is called) and panics.
    pub fn new(mut needs: Vec<Vec<usize>>) -> Result<Self, Cycle> {
        let n = needs.len();
        for list in &mut needs {
            list.sort_unstable();
            list.dedup();
            assert!(list.iter().all(|&j| j < n), "need index out of range");
        }
        let mut dependents = vec![Vec::new(); n];
        for (i, list) in needs.iter().enumerate() {
            for &j in list {
                dependents[j].push(i);
            }
        }

        // Kahn's algorithm; a node left over afterwards lies on or behind a cycle.
        let mut missing: Vec<usize> = needs.iter().map(Vec::len).collect();
        let mut ready: Vec<usize> = (0..n).filter(|&i| missing[i] == 0).rev().collect();
        let mut order = Vec::with_capacity(n);
        let mut stage = vec![0; n];
        while let Some(i) = ready.pop() {
            order.push(i);
            // Dependents are visited in index order so the order is deterministic.
            for &d in dependents[i].iter().rev() {
                stage[d] = stage[d].max(stage[i] + 1);
                missing[d] -= 1;
                if missing[d] == 0 {
                    ready.push(d);
                }
            }
        }
        if order.len() < n {
            return Err(Cycle(find_cycle(&needs, &missing)));
        }
        Ok(Self {
            needs,
            dependents,
            order,
            stage,
        })
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.needs.len()
    }

    /// True for a graph without nodes.
    pub fn is_empty(&self) -> bool {
        self.needs.is_empty()
    }

    /// The nodes `i` needs, ascending.
    pub fn needs(&self, i: usize) -> &[usize] {
        &self.needs[i]
    }

    /// The nodes that need `i`, ascending.
    pub fn dependents(&self, i: usize) -> &[usize] {
        &self.dependents[i]
    }

    /// Every node after all the nodes it needs.
    pub fn topological_order(&self) -> &[usize] {
        &self.order
    }

    /// The stage of node `i`: 0 without needs, else one more than its deepest need.
    pub fn stage_of(&self, i: usize) -> usize {
        self.stage[i]
    }

    /// The nodes grouped into stages (topological layers), each layer ascending. Every node's
    /// needs lie in earlier stages, so the jobs of one stage may all run at once.
    pub fn stages(&self) -> Vec<Vec<usize>> {
        let depth = self.stage.iter().max().map_or(0, |m| m + 1);
        let mut stages = vec![Vec::new(); depth];
        for (i, &s) in self.stage.iter().enumerate() {
            stages[s].push(i);
        }
        stages
    }

    /// Waiting nodes whose needs have all succeeded: the ones to queue now, ascending.
    pub fn ready(&self, status: impl Fn(usize) -> NodeStatus) -> Vec<usize> {
        (0..self.len())
            .filter(|&i| {
                status(i) == NodeStatus::Waiting
                    && self.needs[i]
                        .iter()
                        .all(|&j| status(j) == NodeStatus::Succeeded)
            })
            .collect()
    }

    /// Waiting nodes that can never run because something they need, directly or through
    /// other waiting nodes, finished without success. These are the jobs to cancel.
    pub fn doomed(&self, status: impl Fn(usize) -> NodeStatus) -> Vec<usize> {
        let mut doomed = vec![false; self.len()];
        for &i in &self.order {
            doomed[i] = status(i) == NodeStatus::Waiting
                && self.needs[i]
                    .iter()
                    .any(|&j| doomed[j] || status(j) == NodeStatus::Unsuccessful);
        }
        (0..self.len()).filter(|&i| doomed[i]).collect()
    }
}

/// Finds one cycle among the nodes Kahn's algorithm could not order (`missing[i] > 0`).
///
/// Every such node needs at least one other such node (otherwise it would have been ordered),
/// so walking "first unordered need" from any of them must revisit a node: that loop is a cycle.
fn find_cycle(needs: &[Vec<usize>], missing: &[usize]) -> Vec<usize> {
    let stuck = |i: usize| missing[i] > 0;
    let start = (0..needs.len())
        .find(|&i| stuck(i))
        .expect("called with a cycle");
    let mut seen_at = vec![usize::MAX; needs.len()];
    let mut path = Vec::new();
    let mut at = start;
    while seen_at[at] == usize::MAX {
        seen_at[at] = path.len();
        path.push(at);
        at = *needs[at]
            .iter()
            .find(|&&j| stuck(j))
            .expect("an unordered node needs another unordered node");
    }
    let mut cycle = path.split_off(seen_at[at]);
    let min_pos = cycle
        .iter()
        .enumerate()
        .min_by_key(|(_, v)| **v)
        .map_or(0, |(p, _)| p);
    cycle.rotate_left(min_pos);
    cycle
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_diamond_falls_into_three_stages() {
        // 0 ← 1, 0 ← 2, {1,2} ← 3
        let dag = Dag::new(vec![vec![], vec![0], vec![0], vec![1, 2]]).unwrap();
        assert_eq!(dag.stages(), vec![vec![0], vec![1, 2], vec![3]]);
        assert_eq!(dag.dependents(0), &[1, 2]);
        assert_eq!(dag.topological_order(), &[0, 1, 2, 3]);
    }

    #[test]
    fn a_cycle_is_named_from_its_smallest_node() {
        // 0 needs 3 (outside the cycle), 1 needs 2, 2 needs 3, 3 needs 1.
        let err = Dag::new(vec![vec![3], vec![2], vec![3], vec![1]]).unwrap_err();
        assert_eq!(err, Cycle(vec![1, 2, 3]));
    }

    #[test]
    fn a_node_needing_itself_is_a_cycle() {
        assert_eq!(Dag::new(vec![vec![0]]).unwrap_err(), Cycle(vec![0]));
    }

    #[test]
    fn ready_jobs_are_those_whose_needs_all_succeeded() {
        let dag = Dag::new(vec![vec![], vec![0], vec![0], vec![1, 2]]).unwrap();
        let status = |done: &[usize], running: &[usize]| {
            let done = done.to_vec();
            let running = running.to_vec();
            move |i: usize| {
                if done.contains(&i) {
                    NodeStatus::Succeeded
                } else if running.contains(&i) {
                    NodeStatus::InProgress
                } else {
                    NodeStatus::Waiting
                }
            }
        };
        assert_eq!(dag.ready(status(&[], &[])), vec![0]);
        assert_eq!(dag.ready(status(&[0], &[])), vec![1, 2]);
        assert_eq!(dag.ready(status(&[0, 1], &[2])), Vec::<usize>::new());
        assert_eq!(dag.ready(status(&[0, 1, 2], &[])), vec![3]);
    }

    #[test]
    fn a_failure_dooms_every_waiting_descendant_but_not_siblings() {
        // 0 ← 1 ← 3, 0 ← 2; 1 failed.
        let dag = Dag::new(vec![vec![], vec![0], vec![0], vec![1]]).unwrap();
        let status = |i| match i {
            0 => NodeStatus::Succeeded,
            1 => NodeStatus::Unsuccessful,
            _ => NodeStatus::Waiting,
        };
        assert_eq!(dag.doomed(status), vec![3]);
        assert_eq!(dag.ready(status), vec![2]);
    }

    /// Random DAGs: each node needs only lower-numbered nodes, then the numbering is shuffled
    /// so the algorithm cannot rely on input order.
    fn arb_dag() -> impl Strategy<Value = Vec<Vec<usize>>> {
        (1usize..40)
            .prop_flat_map(|n| {
                let edges = proptest::collection::vec(
                    proptest::collection::vec(any::<prop::sample::Index>(), 0..4),
                    n,
                );
                (edges, Just((0..n).collect::<Vec<_>>()).prop_shuffle())
            })
            .prop_map(|(edges, perm)| {
                let n = edges.len();
                let mut needs = vec![Vec::new(); n];
                for (i, list) in edges.iter().enumerate() {
                    if i == 0 {
                        continue;
                    }
                    for idx in list {
                        let j = idx.index(i);
                        needs[perm[i]].push(perm[j]);
                    }
                }
                needs
            })
    }

    proptest! {
        #[test]
        fn random_dags_keep_topological_order(needs in arb_dag()) {
            let dag = Dag::new(needs.clone()).unwrap();
            let order = dag.topological_order();
            prop_assert_eq!(order.len(), needs.len());
            let mut pos = vec![0; needs.len()];
            for (p, &i) in order.iter().enumerate() { pos[i] = p; }
            for (i, list) in needs.iter().enumerate() {
                for &j in list {
                    prop_assert!(pos[j] < pos[i], "{} needs {} but comes first", i, j);
                    prop_assert!(dag.stage_of(j) < dag.stage_of(i));
                }
            }
            // Stages cover every node exactly once.
            let mut all: Vec<usize> = dag.stages().concat();
            all.sort_unstable();
            prop_assert_eq!(all, (0..needs.len()).collect::<Vec<_>>());
        }

        #[test]
        fn running_ready_jobs_to_completion_finishes_every_node(needs in arb_dag()) {
            let dag = Dag::new(needs).unwrap();
            let mut done = vec![false; dag.len()];
            let mut rounds = 0;
            while done.iter().any(|d| !d) {
                let ready = dag.ready(|i| if done[i] { NodeStatus::Succeeded } else { NodeStatus::Waiting });
                prop_assert!(!ready.is_empty());
                for i in ready { done[i] = true; }
                rounds += 1;
            }
            prop_assert_eq!(rounds, dag.stages().len());
        }

        #[test]
        fn adding_a_back_edge_is_reported_as_a_cycle(needs in arb_dag()) {
            let dag = Dag::new(needs.clone()).unwrap();
            // Find any edge i → j and add j → i.
            if let Some((i, j)) = needs.iter().enumerate().find_map(|(i, l)| l.first().map(|&j| (i, j))) {
                let mut with_back = needs.clone();
                with_back[j].push(i);
                let cycle = Dag::new(with_back.clone()).unwrap_err().0;
                prop_assert!(!cycle.is_empty());
                for (k, &a) in cycle.iter().enumerate() {
                    let b = cycle[(k + 1) % cycle.len()];
                    prop_assert!(with_back[a].contains(&b), "{} does not need {}", a, b);
                }
            }
            let _ = dag;
        }
    }
}
