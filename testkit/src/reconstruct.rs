//! The attacker's side of group views: given released group sums, which individuals'
//! values follow from them, and what they are. Used to test that no combination of
//! releases gives anyone away, and that the solver does catch releases that would.

use std::collections::{BTreeMap, BTreeSet};

/// Tolerance on f64 pivots; membership entries are 0/1 and the systems are small, so
/// anything above it is a real coefficient.
const EPS: f64 = 1e-9;

/// Every person of `people` whose value is a linear combination of the `releases`
/// (each a group and the sum of its members' values), with that value. Gaussian
/// elimination on the augmented membership matrix: a person is recovered iff their
/// indicator vector is in the row space, i.e. some reduced row is exactly that person.
pub fn recover(people: &[String], releases: &[(BTreeSet<String>, f64)]) -> BTreeMap<String, f64> {
    let n = people.len();
    let mut rows: Vec<Vec<f64>> = releases
        .iter()
        .map(|(group, sum)| {
            let mut row: Vec<f64> = people
                .iter()
                .map(|p| if group.contains(p) { 1.0 } else { 0.0 })
                .collect();
            row.push(*sum);
            row
        })
        .collect();
    // Reduced row echelon form over the membership columns.
    let mut rank = 0;
    for c in 0..n {
        let Some(p) = (rank..rows.len()).find(|&i| rows[i][c].abs() > EPS) else {
            continue;
        };
        rows.swap(rank, p);
        let lead = rows[rank][c];
        for v in &mut rows[rank] {
            *v /= lead;
        }
        let pivot = rows[rank].clone();
        for (i, row) in rows.iter_mut().enumerate() {
            if i != rank && row[c].abs() > EPS {
                let f = row[c];
                for (v, pv) in row.iter_mut().zip(&pivot) {
                    *v -= f * pv;
                }
            }
        }
        rank += 1;
    }
    let mut found = BTreeMap::new();
    for row in rows.iter().take(rank) {
        let nonzero: Vec<usize> = (0..n).filter(|&j| row[j].abs() > EPS).collect();
        if let [i] = nonzero[..] {
            found.insert(people[i].clone(), row[n] / row[i]);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("p{i}")).collect()
    }

    fn release(people: &[String], values: &[f64], members: &[usize]) -> (BTreeSet<String>, f64) {
        let group = members.iter().map(|&i| people[i].clone()).collect();
        (group, members.iter().map(|&i| values[i]).sum())
    }

    #[test]
    fn six_five_person_subsets_give_everyone_away() {
        // Sum of all six minus each 5-subset = the one left out; the solver finds each
        // value exactly.
        let people = names(6);
        let values = [600.0, 1200.0, 1800.0, 2400.0, 3000.0, 3600.0];
        let releases: Vec<_> = (0..6)
            .map(|out| {
                let members: Vec<usize> = (0..6).filter(|&i| i != out).collect();
                release(&people, &values, &members)
            })
            .collect();
        let found = recover(&people, &releases);
        assert_eq!(found.len(), 6);
        for (i, p) in people.iter().enumerate() {
            assert!((found[p] - values[i]).abs() < 1e-6, "{p}: {}", found[p]);
        }
    }

    #[test]
    fn a_group_and_its_subgroup_give_away_the_difference_only() {
        let people = names(6);
        let values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let all = release(&people, &values, &[0, 1, 2, 3, 4, 5]);
        let rest = release(&people, &values, &[1, 2, 3, 4, 5]);
        let found = recover(&people, &[all.clone(), rest]);
        assert_eq!(found, BTreeMap::from([("p0".to_string(), 1.0)]));
        // Disjoint halves and the whole: nobody (every combination is a half's sum).
        let a = release(&people, &values, &[0, 1, 2]);
        let b = release(&people, &values, &[3, 4, 5]);
        assert!(recover(&people, &[all, a, b]).is_empty());
    }
}
