//! Which model a name means.
//!
//! A model's identity is its content id; its name is a label each announcer chooses, and keys
//! are free, so how many peers announce a name settles nothing (many made-up keys could make
//! a name mean their model). A name means an id only through a binding this node's operator
//! trusts: the models the node serves itself (checked by the driver first), and
//! [`Bindings`], an allow-list of ids per name from the node's configuration, and name
//! records signed by keys the operator trusts: the names announced by nodes that an operator
//! key in [`Bindings::trust_operator`] vouches for (the operator signs the node's id, the node
//! signs its announcement of the name and id). A name nothing trusted binds means nothing,
//! however many or few announce it: the error lists the ids announced under it, and the user
//! asks by id, binds the name or trusts an operator. Only when the operator chooses to trust
//! announcements ([`Bindings::trust_announced_names`]) does such a name mean the one id
//! announced under it (an error listing the ids when peers announce it for several). Asking
//! by content id needs no binding.

use std::collections::{BTreeMap, HashMap};

use crate::id::ContentId;
use crate::PeerId;

/// Names bound to the ids they may mean, as the operator configured them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bindings {
    by_name: HashMap<String, Vec<ContentId>>,
    /// Operator keys whose nodes' names are trusted.
    operators: Vec<PeerId>,
    /// Whether a name that nothing trusted binds means the one id announced under it.
    announced: bool,
}

impl Bindings {
    /// No bindings.
    pub fn new() -> Self {
        Self::default()
    }

    /// Allows `name` to mean `id` (a name may be bound to several ids: copies of one model
    /// quantised differently, say).
    pub fn bind(&mut self, name: impl Into<String>, id: ContentId) {
        let ids = self.by_name.entry(name.into()).or_default();
        if !ids.contains(&id) {
            ids.push(id);
        }
    }

    /// Parses `NAME=ID` (as given on the command line) and binds it.
    pub fn bind_spec(&mut self, spec: &str) -> Result<(), String> {
        let (name, id) = spec
            .split_once('=')
            .ok_or_else(|| format!("{spec:?} is not NAME=ID"))?;
        if name.is_empty() {
            return Err(format!("{spec:?} has an empty name"));
        }
        let id = id
            .parse::<ContentId>()
            .map_err(|e| format!("{spec:?}: {id:?} is not a content id ({e})"))?;
        self.bind(name, id);
        Ok(())
    }

    /// The ids `name` may mean, if it is bound.
    pub fn get(&self, name: &str) -> Option<&[ContentId]> {
        self.by_name.get(name).map(Vec::as_slice)
    }

    /// Whether nothing is bound.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty() && self.operators.is_empty()
    }

    /// Trusts the names announced by nodes that the operator key `operator` vouches for.
    pub fn trust_operator(&mut self, operator: PeerId) {
        if !self.operators.contains(&operator) {
            self.operators.push(operator);
        }
    }

    /// Whether names announced by nodes of `operator` are trusted.
    pub fn trusts(&self, operator: &PeerId) -> bool {
        self.operators.contains(operator)
    }

    /// Lets a name that nothing trusted binds mean the one id peers announce under it (an
    /// error listing the ids when they announce several). Off by default: then only bound
    /// names, and names trusted operators' nodes announce, mean a model.
    pub fn trust_announced_names(&mut self, announced: bool) {
        self.announced = announced;
    }

    /// Whether a name nothing trusted binds means the one id announced under it.
    pub fn trusts_announced_names(&self) -> bool {
        self.announced
    }
}

/// What a name (or an id) resolved to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    /// A model some alive peer announces.
    Announced(ContentId),
    /// A model asked for by id (or bound) that no alive peer announces: look it up by id.
    Unannounced(ContentId),
}

impl Resolved {
    /// The model's id.
    pub fn id(self) -> ContentId {
        match self {
            Self::Announced(id) | Self::Unannounced(id) => id,
        }
    }
}

/// Why a name means no model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Nobody announces a model of that name, and it is not bound.
    #[error("no node serves a model called {0:?}")]
    Unknown(String),
    /// Peers announce the name for several ids and no binding says which one it means (when
    /// announced names are trusted, or among trusted operators' nodes).
    #[error(
        "the name {name:?} is announced for {} different models: {}; ask for one by its id, \
         or bind the name to the ids you trust (mycel node --bind-model NAME=ID)",
        ids.len(),
        listed(ids)
    )]
    Ambiguous {
        /// The name asked for.
        name: String,
        /// Each id announced under it, with how many alive peers announce it.
        ids: Vec<(ContentId, usize)>,
    },
    /// Nothing trusted binds this name.
    #[error(
        "the name {name:?} is bound to no model this node trusts (announced for: {}); ask for \
         one by its id, bind the name (mycel node --bind-model NAME=ID), trust the operator \
         of the nodes that serve it (mycel node --trust-operator KEY) or, on a network of \
         peers you trust, their announcements (mycel node --trust-announced-names)",
        listed(ids)
    )]
    Unbound {
        /// The name asked for.
        name: String,
        /// Each id announced under it, with how many alive peers announce it.
        ids: Vec<(ContentId, usize)>,
    },
}

/// Each id with how many peers announce it, for an error.
fn listed(ids: &[(ContentId, usize)]) -> String {
    ids.iter()
        .map(|(id, n)| format!("{id} ({n} peer{})", if *n == 1 { "" } else { "s" }))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Resolves `name` (a content id, or a name) among `announced`, the (id, name) of each model
/// offer of the wanted kind from each alive peer (one entry per peer and offer).
pub fn resolve(
    name: &str,
    announced: &[(ContentId, &str)],
    bindings: &Bindings,
) -> Result<Resolved, NameError> {
    resolve_trusting(name, announced, &[], bindings)
}

/// [`resolve`], where `trusted` are the offers among `announced` from nodes of operators
/// the bindings trust: a name they announce means the id they announce it for (and is
/// ambiguous only among them), whatever others announce.
pub fn resolve_trusting(
    name: &str,
    announced: &[(ContentId, &str)],
    trusted: &[(ContentId, &str)],
    bindings: &Bindings,
) -> Result<Resolved, NameError> {
    let is_announced = |id: ContentId| announced.iter().any(|(a, _)| *a == id);
    if let Ok(id) = name.parse::<ContentId>() {
        return Ok(if is_announced(id) {
            Resolved::Announced(id)
        } else {
            Resolved::Unannounced(id)
        });
    }
    let count = |wanted: &dyn Fn(&ContentId, &str) -> bool| {
        let mut counts: BTreeMap<ContentId, usize> = BTreeMap::new();
        for (id, label) in announced {
            if wanted(id, label) {
                *counts.entry(*id).or_default() += 1;
            }
        }
        counts
    };
    if let Some(allowed) = bindings.get(name) {
        // Any id the operator allowed, under whatever label it is announced; the most
        // announced of them (all are trusted alike), the smallest id on a tie.
        let counts = count(&|id, _| allowed.contains(id));
        let best = counts
            .iter()
            .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)))
            .map(|(id, _)| *id);
        return Ok(match (best, allowed.first()) {
            (Some(id), _) => Resolved::Announced(id),
            (None, Some(id)) => Resolved::Unannounced(*id),
            (None, None) => return Err(NameError::Unknown(name.to_owned())),
        });
    }
    let named = |offers: &[(ContentId, &str)]| {
        let mut counts: BTreeMap<ContentId, usize> = BTreeMap::new();
        for (id, label) in offers {
            if *label == name {
                *counts.entry(*id).or_default() += 1;
            }
        }
        counts
    };
    let vouched = named(trusted);
    let by_trusted = !vouched.is_empty();
    let counts = if by_trusted {
        vouched
    } else {
        named(announced)
    };
    if !bindings.announced && !by_trusted {
        return Err(if counts.is_empty() {
            NameError::Unknown(name.to_owned())
        } else {
            NameError::Unbound {
                name: name.to_owned(),
                ids: counts.into_iter().collect(),
            }
        });
    }
    match counts.len() {
        0 => Err(NameError::Unknown(name.to_owned())),
        1 => Ok(Resolved::Announced(*counts.keys().next().expect("one id"))),
        _ => Err(NameError::Ambiguous {
            name: name.to_owned(),
            ids: counts.into_iter().collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(byte: u8) -> ContentId {
        ContentId([byte; 32])
    }

    #[test]
    fn a_name_announced_for_one_id_means_it_and_for_several_is_an_error_listing_them() {
        let honest = [(id(1), "smollm2"), (id(1), "smollm2"), (id(9), "other")];
        // By default an announcement alone binds nothing, even when everyone agrees.
        assert!(matches!(
            resolve("smollm2", &honest, &Bindings::new()),
            Err(NameError::Unbound { .. })
        ));
        let mut bindings = Bindings::new();
        bindings.trust_announced_names(true);
        assert_eq!(
            resolve("smollm2", &honest, &bindings),
            Ok(Resolved::Announced(id(1)))
        );
        // Fifty made-up keys announcing their own model under the same name do not capture
        // it: the name becomes ambiguous, and the error lists both ids with their announcers.
        let mut captured = honest.to_vec();
        captured.extend((0..50).map(|_| (id(2), "smollm2")));
        match resolve("smollm2", &captured, &bindings) {
            Err(NameError::Ambiguous { name, ids }) => {
                assert_eq!(name, "smollm2");
                assert_eq!(ids, vec![(id(1), 2), (id(2), 50)]);
                let message = NameError::Ambiguous { name, ids }.to_string();
                assert!(message.contains(&id(1).to_string()), "{message}");
                assert!(message.contains(&id(2).to_string()), "{message}");
                assert!(message.contains("--bind-model"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            resolve("nobody-serves-this", &captured, &bindings),
            Err(NameError::Unknown("nobody-serves-this".into()))
        );
    }

    #[test]
    fn a_bound_name_means_only_the_ids_it_is_bound_to() {
        let mut bindings = Bindings::new();
        bindings.bind_spec(&format!("smollm2={}", id(1))).unwrap();
        let mut announced = vec![(id(1), "smollm2")];
        announced.extend((0..50).map(|_| (id(2), "smollm2")));
        assert_eq!(
            resolve("smollm2", &announced, &bindings),
            Ok(Resolved::Announced(id(1)))
        );
        // Under another label too: the id is the identity.
        assert_eq!(
            resolve(
                "smollm2",
                &[(id(1), "renamed"), (id(2), "smollm2")],
                &bindings
            ),
            Ok(Resolved::Announced(id(1)))
        );
        // Bound but announced by nobody: looked up by id, never the impostor.
        assert_eq!(
            resolve("smollm2", &[(id(2), "smollm2")], &bindings),
            Ok(Resolved::Unannounced(id(1)))
        );
        // Several trusted ids: the most announced.
        bindings.bind("smollm2", id(3));
        let both = [(id(1), "a"), (id(3), "b"), (id(3), "b")];
        assert_eq!(
            resolve("smollm2", &both, &bindings),
            Ok(Resolved::Announced(id(3)))
        );
    }

    #[test]
    fn names_of_trusted_operators_nodes_hold_and_untrusted_ones_are_refused_by_default() {
        let operator = crate::Keypair::generate_ed25519().public().to_peer_id();
        let mut bindings = Bindings::new();
        bindings.trust_operator(operator);
        assert!(bindings.trusts(&operator) && !bindings.is_empty());
        // Fifty impostors announce their model under the name; the trusted operator's node
        // announces the honest one: the name means it, not ambiguous.
        let trusted = [(id(1), "smollm2")];
        let mut announced = trusted.to_vec();
        announced.extend((0..50).map(|_| (id(2), "smollm2")));
        assert_eq!(
            resolve_trusting("smollm2", &announced, &trusted, &bindings),
            Ok(Resolved::Announced(id(1)))
        );
        // Two ids from trusted nodes: ambiguous among those two only.
        let two = [(id(1), "smollm2"), (id(3), "smollm2")];
        match resolve_trusting("smollm2", &announced, &two, &bindings) {
            Err(NameError::Ambiguous { ids, .. }) => {
                assert_eq!(ids, vec![(id(1), 1), (id(3), 1)])
            }
            other => panic!("{other:?}"),
        }
        // By default a name only untrusted peers announce means nothing, even for one id, and
        // the error lists what is announced and how to trust it.
        match resolve_trusting("smollm2", &[(id(2), "smollm2")], &[], &bindings) {
            Err(e @ NameError::Unbound { .. }) => {
                let message = e.to_string();
                assert!(message.contains(&id(2).to_string()), "{message}");
                assert!(message.contains("--trust-operator"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        // Trusting announcements (the operator's choice) lets it mean the one id.
        let mut open = bindings.clone();
        open.trust_announced_names(true);
        assert_eq!(
            resolve_trusting("smollm2", &[(id(2), "smollm2")], &[], &open),
            Ok(Resolved::Announced(id(2)))
        );
        assert_eq!(
            resolve_trusting("nobody", &[], &[], &bindings),
            Err(NameError::Unknown("nobody".into()))
        );
        // What trusted nodes announce, a binding, or an id still resolve.
        assert_eq!(
            resolve_trusting("smollm2", &announced, &trusted, &bindings),
            Ok(Resolved::Announced(id(1)))
        );
        bindings.bind("other", id(7));
        assert_eq!(
            resolve_trusting("other", &announced, &[], &bindings),
            Ok(Resolved::Unannounced(id(7)))
        );
        assert_eq!(
            resolve_trusting(&id(2).to_string(), &announced, &[], &bindings),
            Ok(Resolved::Announced(id(2)))
        );
    }

    #[test]
    fn an_id_needs_no_binding_and_bad_specs_are_refused() {
        let bindings = Bindings::new();
        let name = id(4).to_string();
        assert_eq!(
            resolve(&name, &[(id(4), "x")], &bindings),
            Ok(Resolved::Announced(id(4)))
        );
        assert_eq!(
            resolve(&name, &[], &bindings),
            Ok(Resolved::Unannounced(id(4)))
        );
        let mut bindings = Bindings::new();
        for bad in ["smollm2", "=x", "smollm2=not-an-id"] {
            assert!(bindings.bind_spec(bad).is_err(), "{bad}");
        }
        assert!(bindings.is_empty());
    }
}
