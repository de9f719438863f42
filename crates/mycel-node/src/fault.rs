//! Fault injection for tests and benchmarks (the `fault-injection` cargo feature; release
//! builds leave it off): a worker told to lie, to be slow, to drop tasks, to crash, to sign
//! badly, to replay old answers or to refuse every task as invalid.

use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use mycel_core::task::{TaskOutput, TaskResult};
use rand::{Rng, SeedableRng};

/// How a worker misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Returns a wrong output of the right shape, the same on every node of `group`: liars
    /// of one group collude.
    Wrong {
        /// The colluding group (each node its own number: independent liars).
        group: u64,
    },
    /// Returns a different random output each time.
    Random,
    /// Waits this long before running each task.
    Slow(Duration),
    /// Drops every task stream without an answer.
    Drop,
    /// Exits the process after running this many tasks.
    CrashAfter(u64),
    /// Signs with a key that is not its own.
    BadSignature,
    /// Answers every task with its first signed answer.
    Replay,
    /// Refuses every task as invalid input (to stop a replicated task for everyone).
    RefuseInvalid,
}

/// `wrong[:GROUP]`, `random`, `slow:MS`, `drop`, `crash:N`, `bad_signature`, `replay`.
impl FromStr for Fault {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, arg) = s.split_once(':').map_or((s, None), |(n, a)| (n, Some(a)));
        let number = |what: &str| -> Result<u64, String> {
            arg.ok_or(format!("{name} needs {what}"))?
                .parse()
                .map_err(|_| format!("{name}: {what} must be a number"))
        };
        Ok(match name {
            "wrong" => Self::Wrong {
                group: arg.map_or(Ok(0), |_| number("a group"))?,
            },
            "random" => Self::Random,
            "slow" => Self::Slow(Duration::from_millis(number("milliseconds")?)),
            "drop" => Self::Drop,
            "crash" => Self::CrashAfter(number("a task count")?),
            "bad_signature" => Self::BadSignature,
            "replay" => Self::Replay,
            "refuse_invalid" => Self::RefuseInvalid,
            _ => {
                return Err(format!(
                    "unknown fault {s:?}: wrong[:GROUP], random, slow:MS, drop, crash:N, \
                     bad_signature, replay or refuse_invalid"
                ))
            }
        })
    }
}

/// A worker's fault and what it needs to remember.
#[derive(Debug)]
pub(crate) struct Injector {
    fault: Fault,
    tasks: Mutex<(u64, Option<TaskResult>)>,
    /// Draws of `Fault::Random`, seeded from the node's configuration when it has a seed.
    rng: Mutex<rand::rngs::StdRng>,
}

impl Injector {
    pub(crate) fn new(fault: Fault, seed: Option<u64>) -> Self {
        let rng = seed.map_or_else(rand::rngs::StdRng::from_entropy, |seed| {
            rand::rngs::StdRng::seed_from_u64(seed ^ 0xfa17)
        });
        Self {
            fault,
            tasks: Mutex::new((0, None)),
            rng: Mutex::new(rng),
        }
    }

    /// Whether every task is refused as invalid.
    pub(crate) fn refuses(&self) -> bool {
        self.fault == Fault::RefuseInvalid
    }

    /// Before a task runs: how long to stall, or `None` to drop it.
    pub(crate) fn before(&self) -> Option<Duration> {
        match self.fault {
            Fault::Drop => None,
            Fault::Slow(wait) => Some(wait),
            _ => Some(Duration::ZERO),
        }
    }

    /// The output as the fault would have it.
    pub(crate) fn output(&self, output: TaskOutput) -> TaskOutput {
        let seed = match self.fault {
            Fault::Wrong { group } => group,
            Fault::Random => self.rng.lock().unwrap_or_else(|e| e.into_inner()).gen(),
            _ => return output,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x11a5);
        match output {
            TaskOutput::Embeddings {
                dims,
                values,
                prompt_tokens,
            } => TaskOutput::Embeddings {
                dims,
                values: values
                    .chunks_exact(4)
                    .flat_map(|_| rng.gen_range(-0.1f32..0.1).to_le_bytes())
                    .collect(),
                prompt_tokens,
            },
            TaskOutput::Generation {
                tokens,
                prompt_tokens,
                finish_reason,
                ..
            } => {
                let tokens: Vec<u32> = tokens.iter().map(|_| rng.gen_range(0..1000)).collect();
                TaskOutput::Generation {
                    text: format!("(wrong answer {seed})"),
                    tokens,
                    prompt_tokens,
                    finish_reason,
                    logprobs: Vec::new(),
                    counted: None,
                }
            }
        }
    }

    /// The signed result as the fault would send it.
    pub(crate) fn result(&self, mut result: TaskResult) -> TaskResult {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        tasks.0 += 1;
        match self.fault {
            Fault::BadSignature => {
                let other = mycel_core::Keypair::generate_ed25519();
                result.signature = other.sign(&result.signature).unwrap_or_default();
            }
            Fault::Replay => {
                if let Some(first) = &tasks.1 {
                    return first.clone();
                }
                tasks.1 = Some(result.clone());
            }
            Fault::CrashAfter(n) if tasks.0 >= n => {
                tracing::warn!("fault injection: crashing after {n} tasks");
                std::process::exit(101);
            }
            _ => {}
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse() {
        assert_eq!("wrong:3".parse(), Ok(Fault::Wrong { group: 3 }));
        assert_eq!("wrong".parse(), Ok(Fault::Wrong { group: 0 }));
        assert_eq!(
            "slow:250".parse(),
            Ok(Fault::Slow(Duration::from_millis(250)))
        );
        assert_eq!("crash:5".parse(), Ok(Fault::CrashAfter(5)));
        assert!("crash".parse::<Fault>().is_err());
        assert!("lie".parse::<Fault>().is_err());
    }

    #[test]
    fn colluders_agree_on_their_wrong_output() {
        let honest = TaskOutput::embeddings(&[vec![0.5; 8]], 3);
        let a = Injector::new(Fault::Wrong { group: 1 }, None).output(honest.clone());
        let b = Injector::new(Fault::Wrong { group: 1 }, None).output(honest.clone());
        let c = Injector::new(Fault::Wrong { group: 2 }, None).output(honest.clone());
        assert_eq!(a, b);
        assert_ne!(a, honest);
        assert_ne!(a, c);
        assert!(a.vectors(1).is_ok(), "the right shape");
    }
}
