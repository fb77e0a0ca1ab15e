//! The accuracy matrix of a task sequence and the standard continual-learning metrics.

/// `R[i][j]`: test accuracy on task `j` after training task `i`, for every task seen so far
/// (`j <= i`). Accuracies are fractions in [0, 1].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AccuracyMatrix {
    rows: Vec<Vec<f64>>,
}

impl AccuracyMatrix {
    /// An empty matrix.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends the row after task `i = self.tasks()`: accuracies on tasks `0..=i`.
    ///
    /// # Panics
    /// If the row does not have `i + 1` entries (a bookkeeping bug, not an input error).
    pub fn push(&mut self, row: Vec<f64>) {
        assert_eq!(
            row.len(),
            self.rows.len() + 1,
            "row after task {} must cover tasks 0..={}",
            self.rows.len(),
            self.rows.len()
        );
        self.rows.push(row);
    }

    /// Tasks trained so far.
    pub fn tasks(&self) -> usize {
        self.rows.len()
    }

    /// `R[i][j]`, if task `j` had been seen after task `i`.
    pub fn get(&self, i: usize, j: usize) -> Option<f64> {
        self.rows.get(i).and_then(|r| r.get(j)).copied()
    }

    /// The rows: row `i` holds the accuracies on tasks `0..=i`.
    pub fn rows(&self) -> &[Vec<f64>] {
        &self.rows
    }

    /// The square `T x T` matrix with `None` where task `j` had not been seen after task `i`.
    pub fn square(&self) -> Vec<Vec<Option<f64>>> {
        let t = self.tasks();
        self.rows
            .iter()
            .map(|r| (0..t).map(|j| r.get(j).copied()).collect())
            .collect()
    }

    /// Mean accuracy over the tasks seen after task `i` (`None` if `i` is not a row).
    pub fn average_after(&self, i: usize) -> Option<f64> {
        self.rows
            .get(i)
            .map(|r| r.iter().sum::<f64>() / r.len() as f64)
    }

    /// Average accuracy after the last task, over all tasks (`None` before any task).
    pub fn average_accuracy(&self) -> Option<f64> {
        self.average_after(self.tasks().checked_sub(1)?)
    }

    /// Average forgetting: over the tasks before the last, the best accuracy any earlier row
    /// had on the task minus its final accuracy (`None` with fewer than two tasks).
    pub fn average_forgetting(&self) -> Option<f64> {
        let last = self.tasks().checked_sub(1).filter(|&l| l > 0)?;
        let sum: f64 = (0..last)
            .map(|j| {
                let best = (j..last)
                    .map(|i| self.rows[i][j])
                    .fold(f64::NEG_INFINITY, f64::max);
                best - self.rows[last][j]
            })
            .sum();
        Some(sum / last as f64)
    }

    /// Backward transfer: over the tasks before the last, the final accuracy minus the
    /// accuracy right after the task was trained (negative when tasks are forgotten; `None`
    /// with fewer than two tasks).
    pub fn backward_transfer(&self) -> Option<f64> {
        let last = self.tasks().checked_sub(1).filter(|&l| l > 0)?;
        let sum: f64 = (0..last)
            .map(|j| self.rows[last][j] - self.rows[j][j])
            .sum();
        Some(sum / last as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_of_a_hand_made_matrix() {
        let mut m = AccuracyMatrix::new();
        assert_eq!(m.average_accuracy(), None);
        m.push(vec![0.9]);
        assert_eq!(m.average_forgetting(), None);
        assert_eq!(m.backward_transfer(), None);
        m.push(vec![0.95, 0.8]);
        m.push(vec![0.7, 0.85, 0.9]);
        assert!((m.average_accuracy().unwrap() - (0.7 + 0.85 + 0.9) / 3.0).abs() < 1e-12);
        // Task 0 peaked at 0.95 (after task 1), task 1 at 0.85 (after task 2 is not earlier:
        // the best earlier accuracy of task 1 is 0.8, its final 0.85).
        let forgetting = ((0.95 - 0.7) + (0.8 - 0.85)) / 2.0;
        assert!((m.average_forgetting().unwrap() - forgetting).abs() < 1e-12);
        let bwt = ((0.7 - 0.9) + (0.85 - 0.8)) / 2.0;
        assert!((m.backward_transfer().unwrap() - bwt).abs() < 1e-12);
        assert_eq!(m.square()[0], vec![Some(0.9), None, None]);
        assert_eq!(m.get(2, 1), Some(0.85));
        assert_eq!(m.get(0, 1), None);
    }
}
