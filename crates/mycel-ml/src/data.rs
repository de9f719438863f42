//! Where training data comes from: CSV and NPY files, the scikit-learn `digits` data shipped
//! with Mycel, and the partitions federated benchmarks give their participants.
//!
//! A source is written as a path (`.csv`: numbers, class in the last column; `.npy`: a 2-D
//! float array, class in the last column) or as `sklearn-digits[:PART][:K/N][:dirichlet=A]`,
//! where PART is `all` (default), `train` or `test` (a stratified 80/20 split with seed 0;
//! features standardised with the training split's statistics, see [`digits`]),
//! and `K/N` takes the K-th (0-based) of N partitions: IID, or by class proportions drawn from
//! a Dirichlet(A) distribution (seed 0) — the usual non-IID benchmark split.

use std::path::Path;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_distr::{Dirichlet, Distribution};

use crate::train::{stratified_split, Dataset};
use crate::{MlError, Result};

/// The scikit-learn digits (1797 8x8 images, values 0..16, class last), shipped in `data/`.
const DIGITS_CSV: &str = include_str!("../../../data/digits.csv");

/// Largest NPY file read whole.
const MAX_NPY_BYTES: u64 = 1 << 30;

/// Loads the dataset a source string names (see the module docs).
pub fn load_source(source: &str) -> Result<Dataset> {
    let bad = |what: String| MlError::Input(format!("dataset source {source:?}: {what}"));
    let Some(rest) = source.strip_prefix("sklearn-digits") else {
        let path = Path::new(source);
        return match path.extension().and_then(|e| e.to_str()) {
            Some("csv") => Dataset::load_csv(path, 1.0),
            Some("npy") => load_npy(path),
            _ => Err(bad(
                "expected a .csv or .npy file, or sklearn-digits[:train|test][:K/N][:dirichlet=A]"
                    .into(),
            )),
        };
    };
    let mut data = digits()?;
    let mut partition = None;
    let mut alpha = None;
    for part in rest.split(':').filter(|p| !p.is_empty()) {
        match part {
            "all" => {}
            "train" => data = stratified_split(&data, 0.2, 0).0,
            "test" => data = stratified_split(&data, 0.2, 0).1,
            p if p.starts_with("dirichlet=") => {
                let a: f64 = p["dirichlet=".len()..]
                    .parse()
                    .map_err(|_| bad(format!("{p:?}: alpha is not a number")))?;
                if !(a.is_finite() && a > 0.0) {
                    return Err(bad("alpha must be above 0".into()));
                }
                alpha = Some(a);
            }
            p => {
                let (k, n) = p
                    .split_once('/')
                    .and_then(|(k, n)| Some((k.parse::<usize>().ok()?, n.parse::<usize>().ok()?)))
                    .ok_or_else(|| {
                        bad(format!("{p:?} is not all, train, test, K/N or dirichlet=A"))
                    })?;
                if n == 0 || k >= n || n > 10_000 {
                    return Err(bad(format!("partition {k}/{n}: K must be below N")));
                }
                partition = Some((k, n));
            }
        }
    }
    Ok(match (partition, alpha) {
        (Some((k, n)), None) => partition_iid(&data, n, 0).swap_remove(k),
        (Some((k, n)), Some(a)) => partition_dirichlet(&data, n, a, 0).swap_remove(k),
        (None, Some(_)) => return Err(bad("dirichlet=A needs a partition K/N".into())),
        (None, None) => data,
    })
}

/// The shipped digits, each feature standardised (as scikit-learn's `StandardScaler` fitted
/// on the training split: minus its mean, over its standard deviation, 1 where that is 0).
/// The statistics are those of the public training split, the same on every node.
///
/// Parsed once per process (they are part of the binary): a job that evaluates on them
/// spent ~3.5 ms of its first round parsing them again.
pub fn digits() -> Result<Dataset> {
    static PARSED: std::sync::OnceLock<std::result::Result<Dataset, String>> =
        std::sync::OnceLock::new();
    PARSED
        .get_or_init(|| parse_digits().map_err(|e| e.to_string()))
        .clone()
        .map_err(MlError::Input)
}

fn parse_digits() -> Result<Dataset> {
    let mut data =
        Dataset::parse_csv(DIGITS_CSV, 1.0).map_err(|e| MlError::Input(format!("digits: {e}")))?;
    let train = stratified_split(&data, 0.2, 0).0;
    let (dim, n) = (train.dim, train.len() as f64);
    let mut mean = vec![0f64; dim];
    let mut square = vec![0f64; dim];
    for row in train.features.chunks_exact(dim) {
        for (j, v) in row.iter().enumerate() {
            mean[j] += f64::from(*v) / n;
            square[j] += f64::from(*v) * f64::from(*v) / n;
        }
    }
    let scale: Vec<f64> = mean
        .iter()
        .zip(&square)
        .map(|(m, s)| {
            let sd = (s - m * m).max(0.0).sqrt();
            if sd > 1e-9 {
                sd
            } else {
                1.0
            }
        })
        .collect();
    for row in data.features.chunks_exact_mut(dim) {
        for (j, v) in row.iter_mut().enumerate() {
            *v = ((f64::from(*v) - mean[j]) / scale[j]) as f32;
        }
    }
    Ok(data)
}

/// `parts` IID partitions of `data` (shuffled by `seed`, sizes differing by at most one).
pub fn partition_iid(data: &Dataset, parts: usize, seed: u64) -> Vec<Dataset> {
    let mut rows: Vec<usize> = (0..data.len()).collect();
    rows.shuffle(&mut StdRng::seed_from_u64(seed));
    (0..parts)
        .map(|p| {
            let mut mine: Vec<usize> = rows.iter().skip(p).step_by(parts).copied().collect();
            mine.sort_unstable();
            data.subset(&mine)
        })
        .collect()
}

/// `parts` non-IID partitions: each class's rows are dealt out in proportions drawn from
/// Dirichlet(`alpha`) (smaller alpha, more skew).
pub fn partition_dirichlet(data: &Dataset, parts: usize, alpha: f64, seed: u64) -> Vec<Dataset> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut assigned: Vec<Vec<usize>> = vec![Vec::new(); parts];
    if parts == 1 {
        return vec![data.clone()];
    }
    let dirichlet = Dirichlet::new(&vec![alpha; parts]).expect("alpha > 0 and 2 or more parts");
    for class in 0..data.classes() as u32 {
        let mut rows: Vec<usize> = (0..data.len())
            .filter(|&i| data.labels[i] == class)
            .collect();
        rows.shuffle(&mut rng);
        let shares = dirichlet.sample(&mut rng);
        let mut start = 0;
        let mut cumulative = 0.0;
        for (p, share) in shares.iter().enumerate() {
            cumulative += share;
            let end = if p + 1 == parts {
                rows.len()
            } else {
                ((cumulative * rows.len() as f64).round() as usize).min(rows.len())
            };
            assigned[p].extend_from_slice(&rows[start..end.max(start)]);
            start = end.max(start);
        }
    }
    assigned
        .into_iter()
        .map(|mut rows| {
            rows.sort_unstable();
            data.subset(&rows)
        })
        .collect()
}

/// A `.npy` file (format 1.0 or 2.0) holding a 2-D little-endian `f4` or `f8` array in C
/// order; the last column is the class.
pub fn load_npy(path: &Path) -> Result<Dataset> {
    let err = |what: &str| MlError::model(path, what);
    let size = std::fs::metadata(path)
        .map_err(|e| MlError::model(path, e))?
        .len();
    if size > MAX_NPY_BYTES {
        return Err(err("larger than 1 GiB"));
    }
    let bytes = std::fs::read(path).map_err(|e| MlError::model(path, e))?;
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(err("not an NPY file"));
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        _ => return Err(err("unsupported NPY version")),
    };
    let header = bytes
        .get(start..start + header_len)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| err("truncated NPY header"))?;
    let width = if header.contains("'<f4'") {
        4
    } else if header.contains("'<f8'") {
        8
    } else {
        return Err(err(
            "the array must be little-endian float32 or float64 ('<f4', '<f8')",
        ));
    };
    if header.contains("'fortran_order': True") {
        return Err(err("the array must be in C order"));
    }
    let shape: Vec<usize> = header
        .split_once("'shape':")
        .and_then(|(_, s)| s.split_once('(')?.1.split_once(')'))
        .map(|(dims, _)| {
            dims.split(',')
                .map(str::trim)
                .filter(|d| !d.is_empty())
                .map(|d| d.parse::<usize>())
                .collect::<std::result::Result<Vec<_>, _>>()
        })
        .and_then(|r| r.ok())
        .ok_or_else(|| err("no readable shape in the NPY header"))?;
    let [rows, cols] = shape[..] else {
        return Err(err("the array must be 2-D (rows, features + class)"));
    };
    if cols < 2 {
        return Err(err("the array needs features and a class column"));
    }
    let body = &bytes[start + header_len..];
    if rows.checked_mul(cols).and_then(|n| n.checked_mul(width)) != Some(body.len()) {
        return Err(err("the data does not match the shape"));
    }
    let values: Vec<f64> = if width == 4 {
        body.chunks_exact(4)
            .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect()
    } else {
        body.chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect()
    };
    let mut features = Vec::with_capacity(rows * (cols - 1));
    let mut labels = Vec::with_capacity(rows);
    for row in values.chunks_exact(cols) {
        let class = row[cols - 1];
        if !(class >= 0.0 && class.fract() == 0.0 && class <= f64::from(u16::MAX)) {
            return Err(err("a class is not a small whole number"));
        }
        if row[..cols - 1].iter().any(|v| !v.is_finite()) {
            return Err(err("a feature is not finite"));
        }
        features.extend(row[..cols - 1].iter().map(|v| *v as f32));
        labels.push(class as u32);
    }
    Ok(Dataset {
        features,
        labels,
        dim: cols - 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_sources_split_and_partition() {
        let all = load_source("sklearn-digits").unwrap();
        assert_eq!((all.len(), all.dim, all.classes()), (1797, 64, 10));
        // Standardised on the training split: mean 0 and deviation 1 (or 0) per feature there.
        let train_all = load_source("sklearn-digits:train").unwrap();
        for j in 0..64 {
            let column: Vec<f64> = train_all
                .features
                .iter()
                .skip(j)
                .step_by(64)
                .map(|v| f64::from(*v))
                .collect();
            let mean = column.iter().sum::<f64>() / column.len() as f64;
            let var =
                column.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / column.len() as f64;
            assert!(
                mean.abs() < 1e-4 && (var < 1e-9 || (var - 1.0).abs() < 1e-3),
                "{j}: {mean} {var}"
            );
        }
        let train = load_source("sklearn-digits:train").unwrap();
        let test = load_source("sklearn-digits:test").unwrap();
        assert_eq!(train.len() + test.len(), 1797);
        let parts: Vec<Dataset> = (0..10)
            .map(|k| load_source(&format!("sklearn-digits:train:{k}/10")).unwrap())
            .collect();
        assert_eq!(parts.iter().map(Dataset::len).sum::<usize>(), train.len());
        assert!(parts
            .iter()
            .all(|p| p.len().abs_diff(train.len() / 10) <= 1));
        let skewed: Vec<Dataset> = (0..10)
            .map(|k| load_source(&format!("sklearn-digits:train:{k}/10:dirichlet=0.5")).unwrap())
            .collect();
        assert_eq!(skewed.iter().map(Dataset::len).sum::<usize>(), train.len());
        // Skewed: some partition misses some class entirely.
        assert!(skewed
            .iter()
            .any(|p| { (0..10).any(|c| !p.labels.contains(&c)) }));
        for bad in [
            "sklearn-digits:3/3",
            "sklearn-digits:dirichlet=0.5",
            "sklearn-digits:x",
            "data.txt",
        ] {
            assert!(load_source(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn npy_files_load_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, header: &str, body: &[u8]| {
            let mut h = header.to_owned();
            while !(10 + h.len() + 1).is_multiple_of(64) {
                h.push(' ');
            }
            h.push('\n');
            let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
            bytes.extend_from_slice(&(h.len() as u16).to_le_bytes());
            bytes.extend_from_slice(h.as_bytes());
            bytes.extend_from_slice(body);
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            path
        };
        let body: Vec<u8> = [0.5f32, 1.5, 1.0, -1.0, 2.0, 0.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let good = write(
            "good.npy",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }",
            &body,
        );
        let data = load_source(good.to_str().unwrap()).unwrap();
        assert_eq!(data.features, vec![0.5, 1.5, -1.0, 2.0]);
        assert_eq!(data.labels, vec![1, 0]);
        let short = write(
            "short.npy",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 3), }",
            &body,
        );
        assert!(load_npy(&short).is_err());
        let ints = write(
            "ints.npy",
            "{'descr': '<i4', 'fortran_order': False, 'shape': (2, 3), }",
            &body,
        );
        assert!(load_npy(&ints).is_err());
        let mut frac = body.clone();
        frac[8..12].copy_from_slice(&0.5f32.to_le_bytes());
        let frac = write(
            "frac.npy",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }",
            &frac,
        );
        assert!(load_npy(&frac).is_err());
    }
}
