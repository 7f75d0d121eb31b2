//! A plain Rust [`UpdateHandler`] scripted per phase, for tests of the agent
//! and the step workflow that need no wasm, no broker and no build.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use anyhow::Result;

use super::CallScope;
use super::{
    CallFault, Description, InstalledItem, Outcome, Phase, Plan, RebootBehaviour,
    RebootExpectation, Status, StepContext, UpdateHandler,
};

/// What a scripted call answers.
#[derive(Debug, Clone)]
pub enum Answer {
    /// An outcome phase's outcome.
    Outcome(Outcome),
    /// `validate`'s plan.
    Plan(Plan),
    /// `is-installed`'s answer.
    Installed(bool),
    /// `inventory`'s items.
    Items(Vec<InstalledItem>),
    /// The handler's failure status (validate, is-installed, inventory).
    Refused(Status),
    /// The call does not return.
    Fault(CallFault),
}

/// Called with each phase as it is called, before it answers.
pub type Observer = Box<dyn Fn(Phase) + Send + Sync>;

/// A handler whose answers are scripted per phase: each scripted answer is
/// used once, in order; then validate plans [`FakeHandler::CRITERIA`],
/// is-installed says no, inventory lists nothing and every other phase
/// succeeds.
pub struct FakeHandler {
    description: Description,
    fingerprint: String,
    config: String,
    answers: Mutex<BTreeMap<&'static str, VecDeque<Answer>>>,
    calls: Mutex<Vec<(Phase, StepContext)>>,
    observer: Option<Observer>,
}

impl FakeHandler {
    /// The installed criteria of the default plan.
    pub const CRITERIA: &'static str = "fake-1";

    /// A handler `name` serving `update_types`, supporting rollback.
    pub fn new(name: &str, update_types: &[&str]) -> Self {
        Self {
            description: Description {
                name: name.into(),
                version: "1.0.0".into(),
                update_types: update_types.iter().map(|t| t.to_string()).collect(),
                contract: "1.1.0".into(),
                supports_rollback: true,
                reboot: RebootBehaviour::Sometimes,
            },
            fingerprint: format!("sha256-of-{name}"),
            config: "{}".into(),
            answers: Mutex::default(),
            calls: Mutex::default(),
            observer: None,
        }
    }

    /// Queues `answer` for the next call of `phase`.
    pub fn answer(self, phase: Phase, answer: Answer) -> Self {
        lock(&self.answers)
            .entry(phase.as_str())
            .or_default()
            .push_back(answer);
        self
    }

    /// Says whether the handler supports rollback.
    pub fn rollback(mut self, supported: bool) -> Self {
        self.description.supports_rollback = supported;
        self
    }

    /// Calls `observer` with each phase before it answers.
    pub fn observe(mut self, observer: impl Fn(Phase) + Send + Sync + 'static) -> Self {
        self.observer = Some(Box::new(observer));
        self
    }

    /// The phases called so far, in order.
    pub fn phases(&self) -> Vec<Phase> {
        lock(&self.calls).iter().map(|(p, _)| *p).collect()
    }

    /// The context of each call so far, in order.
    pub fn contexts(&self) -> Vec<(Phase, StepContext)> {
        lock(&self.calls).clone()
    }

    /// Records the call and takes its scripted answer, if any.
    fn next(&self, phase: Phase, ctx: &StepContext) -> Option<Answer> {
        lock(&self.calls).push((phase, ctx.clone()));
        if let Some(observer) = &self.observer {
            observer(phase);
        }
        lock(&self.answers).get_mut(phase.as_str())?.pop_front()
    }

    fn default_plan() -> Plan {
        Plan {
            installed_criteria: Self::CRITERIA.into(),
            payloads: Vec::new(),
            reboot: RebootExpectation::None,
            warnings: Vec::new(),
            details: Vec::new(),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A scripted answer that does not fit the call.
fn misfit(phase: Phase, answer: &Answer) -> anyhow::Error {
    anyhow::anyhow!("fake handler: {answer:?} is no answer to {phase}")
}

#[async_trait::async_trait]
impl UpdateHandler for FakeHandler {
    fn name(&self) -> &str {
        &self.description.name
    }

    fn description(&self) -> &Description {
        &self.description
    }

    fn update_types(&self) -> Vec<String> {
        self.description.update_types.clone()
    }

    fn config(&self) -> &str {
        &self.config
    }

    fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    async fn describe(&self) -> Result<Description> {
        match self.next(Phase::Describe, &StepContext::default()) {
            None => Ok(self.description.clone()),
            Some(Answer::Fault(fault)) => Err(fault.into()),
            Some(other) => Err(misfit(Phase::Describe, &other)),
        }
    }

    async fn inventory(&self) -> Result<Result<Vec<InstalledItem>, Status>> {
        match self.next(Phase::Inventory, &StepContext::default()) {
            None => Ok(Ok(Vec::new())),
            Some(Answer::Items(items)) => Ok(Ok(items)),
            Some(Answer::Refused(status)) => Ok(Err(status)),
            Some(Answer::Fault(fault)) => Err(fault.into()),
            Some(other) => Err(misfit(Phase::Inventory, &other)),
        }
    }

    async fn validate(&self, _: CallScope, ctx: &StepContext) -> Result<Result<Plan, Status>> {
        match self.next(Phase::Validate, ctx) {
            None => Ok(Ok(Self::default_plan())),
            Some(Answer::Plan(plan)) => Ok(Ok(plan)),
            Some(Answer::Refused(status)) => Ok(Err(status)),
            Some(Answer::Fault(fault)) => Err(fault.into()),
            Some(other) => Err(misfit(Phase::Validate, &other)),
        }
    }

    async fn is_installed(&self, _: CallScope, ctx: &StepContext) -> Result<Result<bool, Status>> {
        match self.next(Phase::IsInstalled, ctx) {
            None => Ok(Ok(false)),
            Some(Answer::Installed(installed)) => Ok(Ok(installed)),
            Some(Answer::Refused(status)) => Ok(Err(status)),
            Some(Answer::Fault(fault)) => Err(fault.into()),
            Some(other) => Err(misfit(Phase::IsInstalled, &other)),
        }
    }

    async fn run_phase(&self, phase: Phase, _: CallScope, ctx: &StepContext) -> Result<Outcome> {
        match self.next(phase, ctx) {
            None => Ok(Outcome::Success),
            Some(Answer::Outcome(outcome)) => Ok(outcome),
            Some(Answer::Fault(fault)) => Err(fault.into()),
            Some(other) => Err(misfit(phase, &other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(name: &str) -> InstalledItem {
        InstalledItem {
            name: name.into(),
            version: "1.0".into(),
            update_type: "acme/fake:1".into(),
            details: Vec::new(),
        }
    }

    #[tokio::test]
    async fn scripted_answers_are_used_once_in_order_then_the_defaults() {
        let refused = Status {
            result_code: 20,
            ..Status::default()
        };
        let handler = FakeHandler::new("fake", &["acme/fake:1"])
            .answer(Phase::Inventory, Answer::Items(vec![item("a")]))
            .answer(Phase::Inventory, Answer::Refused(refused.clone()))
            .answer(Phase::Inventory, Answer::Installed(true));
        let answers = [
            handler.inventory().await.expect("call"),
            handler.inventory().await.expect("call"),
        ];
        assert_eq!(answers, [Ok(vec![item("a")]), Err(refused)]);
        let misfit = handler.inventory().await.expect_err("not an inventory");
        assert!(format!("{misfit:#}").contains("no answer to"), "{misfit:#}");
        assert_eq!(handler.inventory().await.expect("call"), Ok(Vec::new()));
        assert_eq!(handler.phases(), [Phase::Inventory; 4]);
    }
}
