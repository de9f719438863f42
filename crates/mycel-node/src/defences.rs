//! What the node's own defences turned away, beyond the network's rejections of messages
//! (`mycel_rejected_messages_total`) and connections (`mycel_connections_refused_total`):
//! counted in `mycel_defences_total{defence}`, so that an operator sees an attack the node is
//! holding off, and tests can see which defence held.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// An inbound task stream closed at once: its peer held its share of the task slots.
pub const TASK_STREAMS_PAST_SHARE: &str = "task_streams_past_share";
/// An inbound blob stream closed at once: its peer held its share of the blob slots.
pub const BLOB_STREAMS_PAST_SHARE: &str = "blob_streams_past_share";
/// An inbound training stream closed at once: its peer held its share of the training slots.
pub const TRAINING_STREAMS_PAST_SHARE: &str = "training_streams_past_share";
/// A training request refused: no coordinator or job this node's operator allowed.
pub const TRAINING_NOT_ALLOWED: &str = "training_not_allowed";
/// A model fetched on demand that failed to load, dropped from the disk again.
pub const ON_DEMAND_LOAD_FAILED: &str = "on_demand_load_failed";
/// A model fetched on demand that would have passed the on-demand quota, dropped again.
pub const ON_DEMAND_OVER_QUOTA: &str = "on_demand_over_quota";
/// A request by a model name that peers announce for several ids, none bound here.
pub const MODEL_NAME_AMBIGUOUS: &str = "model_name_ambiguous";
/// A request by a model name that nothing this node trusts binds (the default refusal).
pub const MODEL_NAME_UNBOUND: &str = "model_name_unbound";
/// A blob provider left out of the rest of a fetch: silent past the ask's deadline or a
/// grace after another holder answered (a slow honest holder counts too), or it sent what
/// does not belong to the blob.
pub const BLOB_PROVIDER_EXCLUDED: &str = "blob_provider_excluded";
/// A model's chat template stopped at its fuel or its time limit.
pub const TEMPLATE_LIMIT: &str = "template_limit";
/// A peer's task stopped when the worker's limit on its budget ran out.
pub const TASK_BUDGET_SPENT: &str = "task_budget_spent";
/// A peer's task refused: the peer held its share of the model queue.
pub const MODEL_QUEUE_PAST_SHARE: &str = "model_queue_past_share";
/// A training update weighed by the samples its sender announced, not the more it claimed.
pub const TRAINING_SAMPLES_CAPPED: &str = "training_samples_capped";

const ALL: [&str; 13] = [
    TASK_STREAMS_PAST_SHARE,
    BLOB_STREAMS_PAST_SHARE,
    TRAINING_STREAMS_PAST_SHARE,
    TRAINING_NOT_ALLOWED,
    ON_DEMAND_LOAD_FAILED,
    ON_DEMAND_OVER_QUOTA,
    MODEL_NAME_AMBIGUOUS,
    MODEL_NAME_UNBOUND,
    BLOB_PROVIDER_EXCLUDED,
    TEMPLATE_LIMIT,
    TASK_BUDGET_SPENT,
    MODEL_QUEUE_PAST_SHARE,
    TRAINING_SAMPLES_CAPPED,
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DefenceLabel {
    defence: &'static str,
}

/// The counters, shared by every part of a node (clones count together).
#[derive(Debug, Clone, Default)]
pub struct Defences(Family<DefenceLabel, Counter>);

impl Defences {
    /// Counts one thing `defence` turned away.
    pub fn count(&self, defence: &'static str) {
        self.0.get_or_create(&DefenceLabel { defence }).inc();
    }

    /// How many things `defence` turned away so far.
    pub fn total(&self, defence: &'static str) -> u64 {
        self.0.get_or_create(&DefenceLabel { defence }).get()
    }

    /// Registers the counters (every defence shown, at 0 until it acts).
    pub fn register(&self, registry: &mut Registry) {
        for defence in ALL {
            let _ = self.0.get_or_create(&DefenceLabel { defence });
        }
        registry.register(
            "mycel_defences",
            "Things the node's defences turned away, by defence (task, blob and training \
             streams past their peer's share; training for coordinators and jobs the operator \
             did not allow; models fetched on demand that failed to load, dropped again; \
             requests by a name several ids are announced under, or, with only bound names \
             taken, by a name nothing bound or trusted names; blob providers left out of a \
             fetch for silence or bad data; chat templates stopped at their fuel or time \
             limit; peers' tasks stopped at the worker's budget limit or refused past their \
             share of the model queue; training updates weighed by the samples announced, \
             not the more claimed)",
            self.0.clone(),
        );
    }
}
