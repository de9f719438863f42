//! The training API: POST /api/train starts (or resumes) a job, GET /api/train lists jobs,
//! GET /api/train/{id} gives one job's state and per-round metrics.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use mycel_core::fl::{JobId, JobSpec};
use serde::Serialize;
use serde_json::json;

use crate::api::{error, ApiState};
use crate::training::{JobRecord, JobState, RoundMetrics};

/// A job as the API shows it (the weights stay out; the model is a blob per round).
#[derive(Debug, Serialize)]
pub struct JobView {
    /// The job's id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// `running`, `done` or `failed`.
    pub state: &'static str,
    /// Why it failed.
    pub error: Option<String>,
    /// Why it ended before its last round (its privacy budget), if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
    /// The ε it has spent (a differentially private job), at the spec's δ.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epsilon: Option<f64>,
    /// Rounds completed.
    pub round: u32,
    /// Rounds in all.
    pub rounds: u32,
    /// Wall time of the rounds so far, ms.
    pub elapsed_ms: f64,
    /// The latest global model's blob id.
    pub model: Option<String>,
    /// Per-round figures.
    pub metrics: Vec<RoundMetrics>,
    /// Rounds after which the job was resumed.
    pub resumed_after: Vec<u32>,
    /// The spec.
    pub spec: JobSpec,
}

impl From<JobRecord> for JobView {
    fn from(r: JobRecord) -> Self {
        let (state, error) = match &r.state {
            JobState::Running => ("running", None),
            JobState::Done => ("done", None),
            JobState::Failed(e) => ("failed", Some(e.clone())),
        };
        Self {
            id: r.id.to_string(),
            name: r.spec.name.clone(),
            state,
            error,
            stopped: r.stopped.clone(),
            epsilon: r.metrics.iter().rev().find_map(|m| m.epsilon),
            round: r.round,
            rounds: r.spec.rounds,
            elapsed_ms: r.elapsed_ms,
            model: r
                .metrics
                .iter()
                .rev()
                .find_map(|m| m.model)
                .map(|m| m.to_string()),
            metrics: r.metrics,
            resumed_after: r.resumed_after,
            spec: r.spec,
        }
    }
}

pub(crate) async fn start(
    State(state): State<ApiState>,
    spec: Result<Json<JobSpec>, JsonRejection>,
) -> Response {
    let spec = match spec {
        Ok(Json(spec)) => spec,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                format!("the job spec: {}", e.body_text()),
            )
        }
    };
    match state.training.start(spec) {
        Ok(id) => (StatusCode::ACCEPTED, Json(json!({ "id": id.to_string() }))).into_response(),
        Err(e) => error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!("the job spec: {e}"),
        ),
    }
}

pub(crate) async fn list(State(state): State<ApiState>) -> Response {
    match state.training.jobs() {
        Ok(jobs) => Json(jobs.into_iter().map(JobView::from).collect::<Vec<_>>()).into_response(),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("{e:#}"),
        ),
    }
}

pub(crate) async fn show(State(state): State<ApiState>, Path(id): Path<String>) -> Response {
    let id: JobId = match id.parse() {
        Ok(id) => id,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request_error", e),
    };
    match state.training.job(id) {
        Ok(Some(job)) => Json(JobView::from(job)).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no job {id} on this node"),
        ),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("{e:#}"),
        ),
    }
}
