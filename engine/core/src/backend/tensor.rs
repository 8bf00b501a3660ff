//! Activations: dense row-major f32 matrices, one row per token.

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Matrix {
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    pub fn from_vec(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        assert_eq!(
            data.len(),
            rows * cols,
            "matrix data does not match its shape"
        );
        Self { rows, cols, data }
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }

    pub fn row_mut(&mut self, i: usize) -> &mut [f32] {
        &mut self.data[i * self.cols..(i + 1) * self.cols]
    }

    pub fn rows_iter(&self) -> std::slice::ChunksExact<'_, f32> {
        self.data.chunks_exact(self.cols.max(1))
    }

    pub fn rows_iter_mut(&mut self) -> std::slice::ChunksExactMut<'_, f32> {
        self.data.chunks_exact_mut(self.cols.max(1))
    }

    /// Rows `range` as a matrix of their own.
    pub fn rows_range(&self, range: std::ops::Range<usize>) -> Matrix {
        let data = self.data[range.start * self.cols..range.end * self.cols].to_vec();
        Matrix::from_vec(range.len(), self.cols, data)
    }

    /// `parts` one under another (each `cols` wide).
    pub fn stack(parts: Vec<Matrix>, cols: usize) -> Matrix {
        if parts.len() == 1 {
            return parts.into_iter().next().expect("one part");
        }
        let rows = parts.iter().map(|m| m.rows).sum();
        let mut data = Vec::with_capacity(rows * cols);
        for part in parts {
            debug_assert_eq!(part.cols, cols);
            data.extend(part.data);
        }
        Matrix::from_vec(rows, cols, data)
    }

    /// Element-wise `self += other` (residual connections).
    pub fn add_assign(&mut self, other: &Matrix) {
        debug_assert_eq!((self.rows, self.cols), (other.rows, other.cols));
        for (a, b) in self.data.iter_mut().zip(&other.data) {
            *a += b;
        }
    }
}
