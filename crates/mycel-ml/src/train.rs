//! Local training for federated jobs: small classifiers (multinomial logistic regression,
//! MLPs, a small CNN), their weights exchanged as one flat `f32` vector in a fixed order.
//! Dense models train by our own forward and backward pass (`dense.rs`: a federated round's
//! model is so small that candle's per-operation cost dominated); the CNN trains with candle's
//! autograd.
//!
//! Deterministic for a seed: weights are initialised from a seeded RNG (not candle's), the
//! batches are shuffled from a seeded RNG, and the CPU kernels sum in a fixed order.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Tensor, Var, D};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::{MlError, Result};

/// The models a job can train: the job spec's own description (logistic regression, MLPs, a
/// small CNN), whose layer shapes and flat parameter order live in `mycel_core::fl`.
pub use mycel_core::fl::ModelSpec as Architecture;

/// Labelled examples: `features` holds `len() * dim` values, row by row.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// Row-major features.
    pub features: Vec<f32>,
    /// One class per row.
    pub labels: Vec<u32>,
    /// Features per row.
    pub dim: usize,
}

impl Dataset {
    /// Rows.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// No rows.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The rows at `indices`.
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let mut features = Vec::with_capacity(indices.len() * self.dim);
        for &i in indices {
            features.extend_from_slice(&self.features[i * self.dim..(i + 1) * self.dim]);
        }
        Dataset {
            features,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            dim: self.dim,
        }
    }

    /// A CSV file of numbers, one example per line, the class in the last column; every
    /// feature multiplied by `scale`. A first line that is not numeric is taken as a header.
    pub fn load_csv(path: &Path, scale: f32) -> Result<Dataset> {
        let text = std::fs::read_to_string(path).map_err(|e| MlError::model(path, e))?;
        Self::parse_csv(&text, scale).map_err(|e| MlError::model(path, e))
    }

    /// Parses CSV text as [`Dataset::load_csv`] reads it.
    pub fn parse_csv(text: &str, scale: f32) -> std::result::Result<Dataset, String> {
        let bad = |line: usize, what: String| format!("line {line}: {what}");
        let mut features = Vec::new();
        let mut labels = Vec::new();
        let mut dim = None;
        for (n, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let values: Vec<&str> = line.split(',').map(str::trim).collect();
            if n == 0 && values.iter().any(|v| v.parse::<f64>().is_err()) {
                continue;
            }
            if values.len() < 2 {
                return Err(bad(n + 1, "needs features and a class".into()));
            }
            let width = values.len() - 1;
            if *dim.get_or_insert(width) != width {
                return Err(bad(
                    n + 1,
                    format!("{width} features, earlier lines {dim:?}"),
                ));
            }
            for v in &values[..width] {
                let x: f32 = v
                    .parse()
                    .map_err(|_| bad(n + 1, format!("{v:?} is not a number")))?;
                if !x.is_finite() {
                    return Err(bad(n + 1, format!("{v:?} is not finite")));
                }
                features.push(x * scale);
            }
            let label = values[width];
            let class: f64 = label
                .parse()
                .map_err(|_| bad(n + 1, format!("class {label:?} is not a number")))?;
            if class < 0.0 || class.fract() != 0.0 || class > f64::from(u16::MAX) {
                return Err(bad(
                    n + 1,
                    format!("class {label:?} is not a small whole number"),
                ));
            }
            labels.push(class as u32);
        }
        let dim = dim.ok_or("no examples")?;
        Ok(Dataset {
            features,
            labels,
            dim,
        })
    }

    /// A digest of the data (features and labels): what a node announces instead of it.
    pub fn digest(&self) -> mycel_core::id::ContentId {
        let mut h = blake3::Hasher::new();
        h.update(&(self.dim as u64).to_le_bytes());
        for v in &self.features {
            h.update(&v.to_le_bytes());
        }
        for l in &self.labels {
            h.update(&l.to_le_bytes());
        }
        mycel_core::id::ContentId(*h.finalize().as_bytes())
    }

    /// Classes seen (the largest label + 1).
    pub fn classes(&self) -> usize {
        self.labels.iter().max().map_or(0, |m| *m as usize + 1)
    }
}

/// A model being trained: every weight and bias in the flat order of
/// [`Classifier::weights`].
#[derive(Debug)]
pub struct Classifier {
    architecture: Architecture,
    weights: Vec<f32>,
    device: Device,
}

/// How one local training run went.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainReport {
    /// Mean loss over the last epoch's batches.
    pub loss: f32,
    /// Examples seen per epoch.
    pub samples: usize,
}

/// Local training settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainParams {
    /// Passes over the local data.
    pub epochs: usize,
    /// Examples per step.
    pub batch: usize,
    /// Learning rate.
    pub lr: f32,
    /// SGD momentum (0 for plain SGD).
    pub momentum: f32,
    /// FedProx's proximal weight `mu` (0 for none): the loss gains `mu/2 ||w - w_global||^2`.
    pub prox: f32,
}

fn ml(e: candle_core::Error) -> MlError {
    MlError::Run(e.to_string())
}

impl Classifier {
    /// A fresh model, weights drawn uniformly in `±1/sqrt(fan_in)` from `seed`.
    pub fn new(architecture: Architecture, seed: u64) -> Result<Self> {
        architecture.check().map_err(MlError::Input)?;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut flat = Vec::with_capacity(architecture.parameters());
        for (weight, bias) in architecture.shapes() {
            let count: usize = weight.iter().product();
            // Fan-in: everything but the output dimension.
            let bound = 1.0 / ((count / weight[0]) as f32).sqrt();
            for _ in 0..count + bias {
                flat.push(rng.gen_range(-bound..bound));
            }
        }
        Ok(Self {
            architecture,
            weights: flat,
            device: Device::Cpu,
        })
    }

    /// A model with these weights (in [`Classifier::weights`]'s order).
    pub fn from_weights(architecture: Architecture, flat: &[f32]) -> Result<Self> {
        architecture.check().map_err(MlError::Input)?;
        let mut model = Self {
            architecture,
            weights: Vec::new(),
            device: Device::Cpu,
        };
        model.set_weights(flat)?;
        Ok(model)
    }

    /// The architecture.
    pub fn architecture(&self) -> &Architecture {
        &self.architecture
    }

    /// The layer widths when the model is dense (logistic regression, an MLP).
    fn dense_widths(&self) -> Option<Vec<usize>> {
        match self.architecture {
            Architecture::Cnn { .. } => None,
            _ => Some(self.architecture.widths()),
        }
    }

    /// The weights as candle variables: (weight [out, in], bias [out]) per layer.
    fn variables(&self) -> candle_core::Result<Vec<(Var, Var)>> {
        let mut at = 0;
        let mut layers = Vec::new();
        for (shape, outputs) in self.architecture.shapes() {
            let count: usize = shape.iter().product();
            let weight = Tensor::from_slice(&self.weights[at..at + count], shape, &self.device)?;
            at += count;
            let bias = Tensor::from_slice(&self.weights[at..at + outputs], outputs, &self.device)?;
            at += outputs;
            layers.push((Var::from_tensor(&weight)?, Var::from_tensor(&bias)?));
        }
        Ok(layers)
    }

    /// Every weight and bias, layer by layer (weights row-major, then biases).
    pub fn weights(&self) -> Result<Vec<f32>> {
        Ok(self.weights.clone())
    }

    /// Replaces every weight (in [`Classifier::weights`]'s order).
    pub fn set_weights(&mut self, flat: &[f32]) -> Result<()> {
        if flat.len() != self.architecture.parameters() {
            return Err(MlError::Input(format!(
                "{} weights given, the model has {}",
                flat.len(),
                self.architecture.parameters()
            )));
        }
        if flat.iter().any(|v| !v.is_finite()) {
            return Err(MlError::Input("weights must be finite".into()));
        }
        self.weights = flat.to_vec();
        Ok(())
    }

    fn logits(&self, layers: &[(Var, Var)], x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        if let Architecture::Cnn { side, channels, .. } = self.architecture {
            let (kernel, bias) = &layers[0];
            h = h
                .reshape((x.dim(0)?, 1, side, side))?
                .conv2d(kernel.as_tensor(), 1, 1, 1, 1)?
                .broadcast_add(&bias.as_tensor().reshape((1, channels, 1, 1))?)?
                .relu()?
                .max_pool2d(2)?
                .flatten_from(1)?;
            let (w, b) = &layers[1];
            return h.matmul(&w.as_tensor().t()?)?.broadcast_add(b.as_tensor());
        }
        for (i, (w, b)) in layers.iter().enumerate() {
            h = h
                .matmul(&w.as_tensor().t()?)?
                .broadcast_add(b.as_tensor())?;
            if i + 1 < layers.len() {
                h = h.relu()?;
            }
        }
        Ok(h)
    }

    fn tensors(&self, data: &Dataset, rows: &[usize]) -> candle_core::Result<(Tensor, Tensor)> {
        let mut x = Vec::with_capacity(rows.len() * data.dim);
        for &r in rows {
            x.extend_from_slice(&data.features[r * data.dim..(r + 1) * data.dim]);
        }
        let y: Vec<u32> = rows.iter().map(|&r| data.labels[r]).collect();
        Ok((
            Tensor::from_vec(x, (rows.len(), data.dim), &self.device)?,
            Tensor::from_vec(y, rows.len(), &self.device)?,
        ))
    }

    fn check_data(&self, data: &Dataset) -> Result<()> {
        let (inputs, classes) = self.architecture.io();
        if data.dim != inputs {
            return Err(MlError::Input(format!(
                "the data has {} features, the model takes {inputs}",
                data.dim
            )));
        }
        if data.labels.iter().any(|l| *l as usize >= classes) {
            return Err(MlError::Input(format!("a label is not below {classes}")));
        }
        Ok(())
    }

    /// Trains on `data` with minibatch SGD (shuffled by `seed`). The weights it starts from
    /// (the round's global model) anchor FedProx's term.
    pub fn train(
        &mut self,
        data: &Dataset,
        params: &TrainParams,
        seed: u64,
    ) -> Result<TrainReport> {
        self.train_until(data, params, seed, &AtomicBool::new(false))
    }

    /// [`Classifier::train`], stopping with [`MlError::Stopped`] (the weights part-trained)
    /// once `stop` is set: it is checked before each minibatch.
    pub fn train_until(
        &mut self,
        data: &Dataset,
        params: &TrainParams,
        seed: u64,
        stop: &AtomicBool,
    ) -> Result<TrainReport> {
        self.check_data(data)?;
        if data.is_empty() || params.batch == 0 {
            return Err(MlError::Input(
                "no data to train on, or a batch of 0".into(),
            ));
        }
        let orders = epoch_orders(data.len(), params.epochs, seed);
        let loss = match self.dense_widths() {
            Some(widths) => crate::dense::Dense::new(&widths)
                .train(&mut self.weights, data, params, &orders, stop)
                .ok_or(MlError::Stopped)?,
            None => self
                .train_autograd(data, params, &orders, stop)
                .map_err(ml)?
                .ok_or(MlError::Stopped)?,
        };
        Ok(TrainReport {
            loss,
            samples: data.len(),
        })
    }

    /// [`Classifier::train`] by candle's autograd (any architecture; the CNN's path).
    fn train_autograd(
        &mut self,
        data: &Dataset,
        params: &TrainParams,
        orders: &[Vec<usize>],
        stop: &AtomicBool,
    ) -> candle_core::Result<Option<f32>> {
        let layers = self.variables()?;
        // A copy, not `detach`: a detached tensor shares the variable's storage, which the
        // updates below overwrite in place.
        let anchor = layers
            .iter()
            .flat_map(|(w, b)| [w.as_tensor().copy(), b.as_tensor().copy()])
            .collect::<candle_core::Result<Vec<Tensor>>>()?;
        let mut velocity: Vec<Option<Tensor>> = vec![None; anchor.len()];
        let mut last_loss = 0.0;
        for order in orders {
            let (mut sum, mut batches) = (0.0f32, 0usize);
            for rows in order.chunks(params.batch) {
                if stop.load(Ordering::Relaxed) {
                    return Ok(None);
                }
                let (x, y) = self.tensors(data, rows)?;
                let logits = self.logits(&layers, &x)?;
                let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
                let grads = loss.backward()?;
                let vars = layers.iter().flat_map(|(w, b)| [w, b]);
                for ((var, start), v) in vars.zip(&anchor).zip(&mut velocity) {
                    let Some(g) = grads.get(var.as_tensor()) else {
                        continue;
                    };
                    let mut g = g.clone();
                    if params.prox > 0.0 {
                        g = (g + ((var.as_tensor() - start)? * f64::from(params.prox))?)?;
                    }
                    if params.momentum > 0.0 {
                        g = match v.take() {
                            Some(prev) => ((prev * f64::from(params.momentum))? + g)?,
                            None => g,
                        };
                        *v = Some(g.clone());
                    }
                    var.set(&(var.as_tensor() - (g * f64::from(params.lr))?)?)?;
                }
                sum += loss.to_scalar::<f32>()?;
                batches += 1;
            }
            last_loss = sum / batches as f32;
        }
        let mut flat = Vec::with_capacity(self.weights.len());
        for (w, b) in &layers {
            flat.extend(w.as_tensor().flatten_all()?.to_vec1::<f32>()?);
            flat.extend(b.to_vec1::<f32>()?);
        }
        self.weights = flat;
        Ok(Some(last_loss))
    }

    /// Mean loss and accuracy on `data`.
    pub fn evaluate(&self, data: &Dataset) -> Result<(f32, f32)> {
        self.check_data(data)?;
        if data.is_empty() {
            return Err(MlError::Input("no data to evaluate on".into()));
        }
        if let Some(widths) = self.dense_widths() {
            return Ok(crate::dense::Dense::new(&widths).evaluate(&self.weights, data));
        }
        let rows: Vec<usize> = (0..data.len()).collect();
        let run = || -> candle_core::Result<(f32, f32)> {
            let layers = self.variables()?;
            let (x, y) = self.tensors(data, &rows)?;
            let logits = self.logits(&layers, &x)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &y)?.to_scalar::<f32>()?;
            let predicted = logits.argmax(D::Minus1)?;
            let right = predicted
                .eq(&y)?
                .to_dtype(DType::F32)?
                .sum_all()?
                .to_scalar::<f32>()?;
            Ok((loss, right / data.len() as f32))
        };
        run().map_err(ml)
    }
}

/// The order in which [`Classifier::train`] visits `rows` examples in each of `epochs`
/// epochs (at least one) for `seed`; minibatches are consecutive runs of it. Public so that a
/// comparison (the Flower benchmark) can train on exactly the same minibatches.
pub fn epoch_orders(rows: usize, epochs: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..rows).collect();
    (0..epochs.max(1))
        .map(|_| {
            order.shuffle(&mut rng);
            order.clone()
        })
        .collect()
}

/// Splits `data` into train and test, keeping each class's share (`test` fraction of each
/// class, shuffled by `seed`).
pub fn stratified_split(data: &Dataset, test: f64, seed: u64) -> (Dataset, Dataset) {
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut train, mut held) = (Vec::new(), Vec::new());
    for class in 0..data.classes() as u32 {
        let mut rows: Vec<usize> = (0..data.len())
            .filter(|&i| data.labels[i] == class)
            .collect();
        rows.shuffle(&mut rng);
        let cut = (rows.len() as f64 * test).round() as usize;
        held.extend_from_slice(&rows[..cut]);
        train.extend_from_slice(&rows[cut..]);
    }
    train.sort_unstable();
    held.sort_unstable();
    (data.subset(&train), data.subset(&held))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two well-separated blobs per class in 4 dimensions, from `seed`.
    fn blobs(n: usize, seed: u64) -> Dataset {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut features = Vec::new();
        let mut labels = Vec::new();
        for i in 0..n {
            let class = (i % 3) as u32;
            for d in 0..4 {
                let centre = if d == class as usize { 2.0 } else { 0.0 };
                features.push(centre + rng.gen_range(-0.5..0.5));
            }
            labels.push(class);
        }
        Dataset {
            features,
            labels,
            dim: 4,
        }
    }

    #[test]
    fn an_mlp_learns_and_the_same_seed_gives_the_same_weights() {
        let data = blobs(300, 1);
        let (train, test) = stratified_split(&data, 0.2, 7);
        assert_eq!(test.len(), 60);
        let arch = Architecture::Mlp {
            layers: vec![4, 8, 3],
        };
        let params = TrainParams {
            epochs: 5,
            batch: 16,
            lr: 0.1,
            momentum: 0.5,
            prox: 0.0,
        };
        let run = || {
            let mut model = Classifier::new(arch.clone(), 3).unwrap();
            let (_, before) = model.evaluate(&test).unwrap();
            model.train(&train, &params, 11).unwrap();
            let (_, after) = model.evaluate(&test).unwrap();
            (before, after, model.weights().unwrap())
        };
        let (before, after, weights) = run();
        assert!(
            after > 0.95 && after > before,
            "accuracy {before} -> {after}"
        );
        assert_eq!(weights.len(), arch.parameters());
        assert_eq!(run().2, weights, "deterministic for a seed");
    }

    #[test]
    fn the_dense_pass_trains_as_candles_autograd_does() {
        let data = crate::data::load_source("sklearn-digits:train:0/10").unwrap();
        let test = crate::data::load_source("sklearn-digits:test").unwrap();
        for (arch, momentum, prox) in [
            (
                Architecture::Mlp {
                    layers: vec![64, 32, 10],
                },
                0.0,
                0.0,
            ),
            (
                Architecture::Mlp {
                    layers: vec![64, 16, 12, 10],
                },
                0.9,
                0.1,
            ),
            (
                Architecture::Logistic {
                    inputs: 64,
                    classes: 10,
                },
                0.5,
                0.0,
            ),
        ] {
            let params = TrainParams {
                epochs: 2,
                batch: 32,
                lr: 0.1,
                momentum,
                prox,
            };
            let mut dense = Classifier::new(arch.clone(), 4).unwrap();
            let mut reference = Classifier::new(arch.clone(), 4).unwrap();
            let loss = dense.train(&data, &params, 9).unwrap().loss;
            let orders = epoch_orders(data.len(), params.epochs, 9);
            let reference_loss = reference
                .train_autograd(&data, &params, &orders, &AtomicBool::new(false))
                .unwrap()
                .unwrap();
            assert!(
                (loss - reference_loss).abs() < 1e-4,
                "{loss} vs {reference_loss}"
            );
            let worst = dense
                .weights
                .iter()
                .zip(&reference.weights)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(worst < 1e-4, "{arch:?}: weights differ by {worst}");
            // Evaluation: the dense pass against candle's on the same weights.
            let (loss, accuracy) = dense.evaluate(&test).unwrap();
            let reference = {
                let rows: Vec<usize> = (0..test.len()).collect();
                let vars = dense.variables().unwrap();
                let (x, y) = dense.tensors(&test, &rows).unwrap();
                let logits = dense.logits(&vars, &x).unwrap();
                let loss = candle_nn::loss::cross_entropy(&logits, &y)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                let right = logits
                    .argmax(D::Minus1)
                    .unwrap()
                    .eq(&y)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                (loss, right / test.len() as f32)
            };
            assert!((loss - reference.0).abs() < 1e-4, "{loss} vs {reference:?}");
            assert_eq!(accuracy, reference.1);
        }
    }

    #[test]
    fn weights_round_trip_and_fedprox_stays_nearer_the_global_model() {
        let data = blobs(120, 2);
        let arch = Architecture::Logistic {
            inputs: 4,
            classes: 3,
        };
        let mut model = Classifier::new(arch.clone(), 1).unwrap();
        let global = model.weights().unwrap();
        let mut copy = Classifier::new(arch, 99).unwrap();
        copy.set_weights(&global).unwrap();
        assert_eq!(copy.weights().unwrap(), global);
        assert!(copy.set_weights(&global[1..]).is_err());
        assert!(copy.set_weights(&vec![f32::NAN; global.len()]).is_err());

        let drift = |prox: f32| {
            let mut m = Classifier::new(model.architecture().clone(), 1).unwrap();
            let params = TrainParams {
                epochs: 3,
                batch: 8,
                lr: 0.5,
                momentum: 0.0,
                prox,
            };
            m.train(&data, &params, 5).unwrap();
            let w = m.weights().unwrap();
            w.iter()
                .zip(&global)
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f32>()
        };
        assert!(
            drift(1.0) < 0.8 * drift(0.0),
            "{} vs {}",
            drift(1.0),
            drift(0.0)
        );
        model
            .train(
                &data,
                &TrainParams {
                    epochs: 1,
                    batch: 8,
                    lr: 0.1,
                    momentum: 0.0,
                    prox: 0.0,
                },
                1,
            )
            .unwrap();
    }

    #[test]
    fn a_small_cnn_learns_the_digits_and_round_trips_its_weights() {
        let data = crate::data::digits().unwrap();
        let (train, test) = stratified_split(&data, 0.2, 0);
        let arch = Architecture::Cnn {
            side: 8,
            channels: 4,
            classes: 10,
        };
        assert_eq!(arch.parameters(), 4 * 9 + 4 + 10 * 4 * 16 + 10);
        let mut model = Classifier::new(arch.clone(), 0).unwrap();
        let params = TrainParams {
            epochs: 3,
            batch: 32,
            lr: 0.1,
            momentum: 0.0,
            prox: 0.0,
        };
        model.train(&train, &params, 0).unwrap();
        let (_, accuracy) = model.evaluate(&test).unwrap();
        assert!(accuracy > 0.85, "{accuracy}");
        let mut copy = Classifier::new(arch, 5).unwrap();
        copy.set_weights(&model.weights().unwrap()).unwrap();
        assert_eq!(copy.evaluate(&test).unwrap().1, accuracy);
        assert!(Classifier::new(
            Architecture::Cnn {
                side: 7,
                channels: 4,
                classes: 10
            },
            0
        )
        .is_err());
    }

    #[test]
    fn a_centralised_mlp_on_the_digits_reaches_the_bench_ceiling() {
        let data = crate::data::digits().unwrap();
        assert_eq!((data.len(), data.dim, data.classes()), (1797, 64, 10));
        let (train, test) = stratified_split(&data, 0.2, 0);
        let mut model = Classifier::new(
            Architecture::Mlp {
                layers: vec![64, 32, 10],
            },
            0,
        )
        .unwrap();
        let params = TrainParams {
            epochs: 20,
            batch: 32,
            lr: 0.1,
            momentum: 0.0,
            prox: 0.0,
        };
        model.train(&train, &params, 0).unwrap();
        let (_, accuracy) = model.evaluate(&test).unwrap();
        assert!(accuracy > 0.9, "{accuracy}");
    }

    #[test]
    fn bad_data_is_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("d.csv");
        std::fs::write(&csv, "1,2,0\n3,4,1\n").unwrap();
        let data = Dataset::load_csv(&csv, 0.5).unwrap();
        assert_eq!(data.features, vec![0.5, 1.0, 1.5, 2.0]);
        assert_eq!(data.labels, vec![0, 1]);
        for bad in [
            "1,2,0\n3,1\n",
            "1,x,0\n",
            "1,2,-1\n",
            "1,2,0.5\n",
            "",
            "1,inf,0\n",
        ] {
            std::fs::write(&csv, bad).unwrap();
            assert!(Dataset::load_csv(&csv, 1.0).is_err(), "{bad:?}");
        }
        let model = Classifier::new(
            Architecture::Logistic {
                inputs: 3,
                classes: 2,
            },
            1,
        )
        .unwrap();
        assert!(
            model.evaluate(&data).is_err(),
            "2 features for a 3-input model"
        );
        let model = Classifier::new(
            Architecture::Logistic {
                inputs: 2,
                classes: 1,
            },
            1,
        )
        .unwrap();
        assert!(
            model.evaluate(&data).is_err(),
            "label 1 for a 1-class model"
        );
        assert!(Classifier::new(Architecture::Mlp { layers: vec![3] }, 1).is_err());
    }
}
