//! Bad input is refused with the right gRPC code and a message that names
//! the culprit, and a refusal changes nothing: a refused Init creates no
//! job, and a refused push is not counted, keeps no gradient and leaves the
//! parameters, the round and the step as they were.

use std::collections::BTreeMap;
use std::fmt::Debug;

use bytes::Bytes;
use paramd_client::v1 as pb;
use paramd_client::{Client, ClientError};
use paramd_proto::v1::param_server_client::ParamServerClient;
use paramd_tests::TestServer;
use tonic::Code;
use tonic::transport::Channel;

/// The learning rate of the SGD jobs.
const LR: f64 = 0.1;

/// The parameters of every job here: a matrix, a scalar and a vector.
const SHAPES: &[(&str, &[u64])] = &[("w", &[2, 3]), ("b", &[]), ("e", &[4])];

/// Tensors by name, in `SHAPES` order.
type Tensors = Vec<(&'static str, Vec<f32>)>;

/// Parameter values by name.
type Params = BTreeMap<String, Vec<f32>>;

// ---------------------------------------------------------------------------
// Specs and tensors.

fn param(name: &str, shape: &[u64]) -> pb::ParamSpec {
    pb::ParamSpec {
        name: name.to_owned(),
        shape: shape.to_vec(),
    }
}

fn optimizer(kind: pb::OptimizerKind, hyper: pb::Hyperparameters) -> Option<pb::Optimizer> {
    Some(pb::Optimizer {
        kind: kind as i32,
        hyper: Some(hyper),
    })
}

fn lr(lr: f64) -> pb::Hyperparameters {
    pb::Hyperparameters {
        lr: Some(lr),
        ..Default::default()
    }
}

fn group(params: &[&str], hyper: Option<pb::Hyperparameters>) -> pb::ParamGroup {
    pb::ParamGroup {
        params: params.iter().map(|p| (*p).to_owned()).collect(),
        hyper,
    }
}

/// `w` [2, 3], `b` [], `e` [4]; 2 workers; SGD with lr 0.1.
fn spec() -> pb::JobSpec {
    pb::JobSpec {
        params: SHAPES.iter().map(|(n, s)| param(n, s)).collect(),
        optimizer: optimizer(pb::OptimizerKind::Sgd, lr(LR)),
        workers: 2,
        ..Default::default()
    }
}

/// `spec()` with Adam (or AdamW) and the given hyperparameters.
fn adam_spec(kind: pb::OptimizerKind, hyper: pb::Hyperparameters) -> pb::JobSpec {
    pb::JobSpec {
        optimizer: optimizer(kind, hyper),
        ..spec()
    }
}

/// `spec()` with SGD and the given hyperparameters.
fn sgd_spec(hyper: pb::Hyperparameters) -> pb::JobSpec {
    adam_spec(pb::OptimizerKind::Sgd, hyper)
}

fn numel(shape: &[u64]) -> usize {
    shape.iter().map(|&d| d as usize).product()
}

fn initial() -> Tensors {
    vec![
        ("w", vec![0.5, -1.25, 2.0, 0.3, -0.7, 1.1]),
        ("b", vec![0.42]),
        ("e", vec![3.0, -2.5, 0.01, 7.7]),
    ]
}

/// Worker `worker`'s gradients for `round`: distinct per worker, round,
/// parameter and element, and not exactly representable.
fn grads(worker: u32, round: u64) -> Tensors {
    SHAPES
        .iter()
        .enumerate()
        .map(|(p, (name, shape))| {
            let values = (0..numel(shape))
                .map(|i| {
                    let k = (p * 7 + i * 3 + worker as usize * 5 + round as usize * 11) % 13;
                    k as f32 * 0.37 - 2.1 + worker as f32 * 0.013
                })
                .collect();
            (*name, values)
        })
        .collect()
}

fn refs(t: &Tensors) -> Vec<(&str, &[f32])> {
    t.iter().map(|(n, v)| (*n, v.as_slice())).collect()
}

fn as_params(t: &Tensors) -> Params {
    t.iter()
        .map(|(n, v)| ((*n).to_owned(), v.clone()))
        .collect()
}

fn get<'a>(t: &'a Tensors, name: &str) -> &'a [f32] {
    &t.iter().find(|(n, _)| *n == name).expect("tensor").1
}

/// One SGD step (no momentum, no decay, no clip) by hand, in f32 as the
/// server (and torch) computes it: `p - lr * mean(g0, g1)`, the
/// multiply-add rounded once.
fn sgd_step(params: &Params, g0: &Tensors, g1: &Tensors) -> Params {
    let neg_lr = (-LR) as f32;
    params
        .iter()
        .map(|(name, p)| {
            let (a, b) = (get(g0, name), get(g1, name));
            let next = p
                .iter()
                .zip(a.iter().zip(b))
                .map(|(p, (a, b))| ((*a + *b) / 2.0).mul_add(neg_lr, *p))
                .collect();
            (name.clone(), next)
        })
        .collect()
}

fn bits(p: &Params) -> BTreeMap<String, Vec<u32>> {
    p.iter()
        .map(|(n, v)| (n.clone(), v.iter().map(|x| x.to_bits()).collect()))
        .collect()
}

fn segment(param: &str, offset: u64, values: &[f32]) -> pb::Segment {
    pb::Segment {
        param: param.to_owned(),
        offset,
        data: paramd_client::to_le_bytes(values),
    }
}

/// Every tensor of `t` as one segment.
fn segments(t: &Tensors) -> Vec<pb::Segment> {
    t.iter().map(|(n, v)| segment(n, 0, v)).collect()
}

/// The segments of `t` but the one named `name`.
fn segments_without(t: &Tensors, name: &str) -> Vec<pb::Segment> {
    segments(t)
        .into_iter()
        .filter(|s| s.param != name)
        .collect()
}

// ---------------------------------------------------------------------------
// Calls and checks.

/// Asserts that `s` has `code` and a message holding every part.
fn check_status(s: &tonic::Status, code: Code, parts: &[String], what: &str) {
    assert_eq!(
        s.code(),
        code,
        "{what}: wrong code, message {:?}",
        s.message()
    );
    for part in parts {
        assert!(
            s.message().contains(part.as_str()),
            "{what}: message {:?} should contain {part:?}",
            s.message()
        );
    }
    // Stale and early pushes say so in a machine-readable trailer too.
    if let Some(kind) = parts
        .first()
        .filter(|p| ["stale", "early"].contains(&p.as_str()))
    {
        let reason = s
            .metadata()
            .get(paramd_proto::transport::REASON)
            .and_then(|v| v.to_str().ok());
        assert_eq!(reason, Some(kind.as_str()), "{what}: reason");
    }
}

/// Asserts that a client call was refused with `code` and a message holding
/// every part; returns the message.
fn refused<T: Debug>(r: Result<T, ClientError>, code: Code, parts: &[&str], what: &str) -> String {
    let e = match r {
        Ok(v) => panic!("{what}: accepted, got {v:?}"),
        Err(e) => e,
    };
    let s = e
        .status()
        .unwrap_or_else(|| panic!("{what}: not a gRPC status: {e}"));
    let parts: Vec<String> = parts.iter().map(|p| (*p).to_owned()).collect();
    check_status(s, code, &parts, what);
    s.message().to_owned()
}

async fn job_status(client: &mut Client, job: &str) -> pb::JobStatus {
    let mut r = client.status(Some(job)).await.expect("status");
    assert_eq!(r.jobs.len(), 1, "status of one job");
    let s = r.jobs.remove(0);
    assert_eq!(s.job, job);
    s
}

/// Asserts that job `job` does not exist.
async fn assert_absent(client: &mut Client, job: &str, what: &str) {
    refused(
        client.status(Some(job)).await,
        Code::NotFound,
        &[&format!("'{job}'")],
        &format!("{what}: status of the refused job"),
    );
}

/// Everything a refusal must leave as it was.
#[derive(Debug, PartialEq)]
struct Seen {
    round: u64,
    step: u64,
    workers_pushed: u32,
    rounds_skipped: u64,
    /// `(round, step, skipped)` of the last outcome.
    last: Option<(u64, u64, bool)>,
    /// The pulled parameters, as bits.
    params: BTreeMap<String, Vec<u32>>,
}

async fn seen(client: &mut Client, job: &str) -> Seen {
    let s = job_status(client, job).await;
    let pulled = client.pull(job, s.round).await.expect("pull");
    assert_eq!(pulled.round, s.round, "pull and status agree on the round");
    let params: Params = pulled.params.into_iter().collect();
    Seen {
        round: s.round,
        step: s.step,
        workers_pushed: s.workers_pushed,
        rounds_skipped: s.rounds_skipped,
        last: s.last.map(|l| (l.round, l.step, l.skipped)),
        params: bits(&params),
    }
}

/// Pulls every parameter once `round` rounds have completed.
async fn pull(client: &mut Client, job: &str, round: u64) -> (Params, pb::RoundOutcome) {
    let pulled = client.pull(job, round).await.expect("pull");
    assert_eq!(pulled.round, round, "pulled round");
    let last = pulled.last.expect("an outcome after a round");
    (pulled.params.into_iter().collect(), last)
}

/// Pushes `grads` as worker `worker` for `round`, expecting it counted as the
/// `pushed`-th push of the round.
async fn push_ok(
    client: &mut Client,
    job: &str,
    worker: u32,
    round: u64,
    grads: &Tensors,
    pushed: u32,
) {
    let r = client
        .push(job, worker, round, &refs(grads))
        .await
        .unwrap_or_else(|e| panic!("push of worker {worker} for round {round}: {e}"));
    assert!(
        !r.duplicate,
        "worker {worker}, round {round}: not a duplicate"
    );
    assert_eq!(
        r.pushed, pushed,
        "worker {worker}, round {round}: workers counted"
    );
}

/// Waits for round `round` to complete and checks it applied exactly one
/// SGD step of `mean(grads(0, round), grads(1, round))` to `before`, as
/// optimizer step `step`. Returns the new parameters.
async fn check_applied(
    client: &mut Client,
    job: &str,
    round: u64,
    step: u64,
    before: &Params,
) -> Params {
    let want = sgd_step(before, &grads(0, round), &grads(1, round));
    let (got, last) = pull(client, job, round + 1).await;
    assert_eq!(
        bits(&got),
        bits(&want),
        "round {round}: p - lr * mean(g)\n got {got:?}\nwant {want:?}"
    );
    assert_ne!(
        bits(&got),
        bits(before),
        "round {round} changed the parameters"
    );
    assert_eq!(
        (last.round, last.step, last.skipped),
        (round, step, false),
        "round {round}: outcome"
    );
    let s = job_status(client, job).await;
    assert_eq!(
        (s.round, s.step, s.workers_pushed),
        (round + 1, step, 0),
        "round {round}: status"
    );
    got
}

/// Runs round `round` with both workers' legitimate gradients.
async fn run_round(
    client: &mut Client,
    job: &str,
    round: u64,
    step: u64,
    before: &Params,
) -> Params {
    push_ok(client, job, 0, round, &grads(0, round), 1).await;
    push_ok(client, job, 1, round, &grads(1, round), 2).await;
    check_applied(client, job, round, step, before).await
}

/// Creates job `job` from `spec` with the usual initial values.
async fn create(client: &mut Client, job: &str, spec: pb::JobSpec) {
    let r = client
        .init(job, spec, &refs(&initial()))
        .await
        .expect("init");
    assert!(r.created, "job {job} created");
    assert_eq!(r.round, 0, "a new job starts at round 0");
}

async fn raw_push(
    raw: &mut ParamServerClient<Channel>,
    job: &str,
    worker: u32,
    round: u64,
    grads: Vec<pb::Segment>,
) -> Result<pb::PushResponse, tonic::Status> {
    let req = pb::PushRequest {
        job: job.to_owned(),
        worker,
        round,
        grads,
        no_grad: Vec::new(),
    };
    raw.push(tokio_stream::iter(vec![req]))
        .await
        .map(tonic::Response::into_inner)
}

// ---------------------------------------------------------------------------
// Init.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_configs_are_refused_naming_the_field_and_create_nothing() {
    use pb::OptimizerKind::{Adam, Adamw, Unspecified};
    use pb::schedule::Kind;

    let server = TestServer::start().await;
    let mut client = server.client().await;
    let hyper = pb::Hyperparameters::default;
    let schedule = |k: Kind| Some(pb::Schedule { kind: Some(k) });
    let long_name = "j".repeat(129);

    // (what, job name, spec, parts of the message)
    let cases: Vec<(&str, &str, pb::JobSpec, Vec<&str>)> = vec![
        (
            "negative lr",
            "neg-lr",
            sgd_spec(lr(-1.0)),
            vec!["optimizer.lr", "got -1"],
        ),
        (
            "negative lr of a param group",
            "neg-group-lr",
            pb::JobSpec {
                param_groups: vec![group(&["w"], None), group(&["b", "e"], Some(lr(-0.5)))],
                ..spec()
            },
            vec!["param_groups[1].lr", "got -0.5"],
        ),
        (
            "negative eps",
            "neg-eps",
            adam_spec(
                Adam,
                pb::Hyperparameters {
                    eps: Some(-0.5),
                    ..hyper()
                },
            ),
            vec!["optimizer.eps", "got -0.5"],
        ),
        (
            "beta1 of 1",
            "beta1-one",
            adam_spec(
                Adam,
                pb::Hyperparameters {
                    beta1: Some(1.0),
                    ..hyper()
                },
            ),
            vec!["optimizer.beta1", "got 1", "[0, 1)"],
        ),
        (
            "negative beta2",
            "beta2-neg",
            adam_spec(
                Adamw,
                pb::Hyperparameters {
                    beta2: Some(-0.1),
                    ..hyper()
                },
            ),
            vec!["optimizer.beta2", "got -0.1"],
        ),
        (
            "beta2 of 1 in a param group",
            "group-beta2-one",
            pb::JobSpec {
                param_groups: vec![group(
                    &["w", "b", "e"],
                    Some(pb::Hyperparameters {
                        beta2: Some(1.0),
                        ..hyper()
                    }),
                )],
                ..adam_spec(Adam, hyper())
            },
            vec!["param_groups[0].beta2", "got 1"],
        ),
        (
            "negative weight_decay",
            "neg-wd",
            sgd_spec(pb::Hyperparameters {
                weight_decay: Some(-0.01),
                ..lr(LR)
            }),
            vec!["optimizer.weight_decay", "got -0.01"],
        ),
        (
            "negative weight_decay of AdamW",
            "neg-wd-adamw",
            adam_spec(
                Adamw,
                pb::Hyperparameters {
                    weight_decay: Some(-0.25),
                    ..hyper()
                },
            ),
            vec!["optimizer.weight_decay", "got -0.25"],
        ),
        (
            "negative momentum",
            "neg-momentum",
            sgd_spec(pb::Hyperparameters {
                momentum: Some(-0.9),
                ..lr(LR)
            }),
            vec!["optimizer.momentum", "got -0.9"],
        ),
        (
            "nesterov without momentum",
            "nesterov-no-momentum",
            sgd_spec(pb::Hyperparameters {
                nesterov: Some(true),
                ..lr(LR)
            }),
            vec!["optimizer.nesterov", "momentum 0"],
        ),
        (
            "nesterov with dampening",
            "nesterov-dampening",
            sgd_spec(pb::Hyperparameters {
                nesterov: Some(true),
                momentum: Some(0.9),
                dampening: Some(0.1),
                ..lr(LR)
            }),
            vec!["optimizer.nesterov", "dampening 0.1"],
        ),
        (
            "warmup longer than the schedule",
            "warmup-too-long",
            pb::JobSpec {
                schedule: schedule(Kind::WarmupCosine(pb::WarmupCosine {
                    warmup_steps: 10,
                    total_steps: 5,
                    min_lr_ratio: 0.0,
                })),
                ..spec()
            },
            vec!["schedule.warmup_steps (10)", "schedule.total_steps (5)"],
        ),
        (
            "min_lr_ratio above 1",
            "min-lr-ratio",
            pb::JobSpec {
                schedule: schedule(Kind::WarmupCosine(pb::WarmupCosine {
                    warmup_steps: 1,
                    total_steps: 5,
                    min_lr_ratio: 1.5,
                })),
                ..spec()
            },
            vec!["schedule.min_lr_ratio", "got 1.5"],
        ),
        (
            "cosine annealing over 0 steps",
            "t-max-zero",
            pb::JobSpec {
                schedule: schedule(Kind::CosineAnnealing(pb::CosineAnnealing {
                    t_max: 0,
                    eta_min: 0.0,
                })),
                ..spec()
            },
            vec!["schedule.t_max", "got 0"],
        ),
        (
            "clip max_norm 0",
            "clip-zero",
            pb::JobSpec {
                clip: Some(pb::Clip { max_norm: 0.0 }),
                ..spec()
            },
            vec!["clip.max_norm", "got 0"],
        ),
        (
            "negative clip max_norm",
            "clip-neg",
            pb::JobSpec {
                clip: Some(pb::Clip { max_norm: -1.0 }),
                ..spec()
            },
            vec!["clip.max_norm", "got -1"],
        ),
        (
            "a parameter in two groups",
            "two-groups",
            pb::JobSpec {
                param_groups: vec![group(&["w", "b"], None), group(&["b", "e"], None)],
                ..spec()
            },
            vec!["'b'", "two param groups"],
        ),
        (
            "a parameter in no group",
            "no-group",
            pb::JobSpec {
                param_groups: vec![group(&["w"], None), group(&["e"], None)],
                ..spec()
            },
            vec!["'b'", "no param group"],
        ),
        (
            "a group naming an unknown parameter",
            "unknown-in-group",
            pb::JobSpec {
                param_groups: vec![group(&["w", "b"], None), group(&["e", "z"], None)],
                ..spec()
            },
            vec!["param_groups[1]", "unknown parameter 'z'"],
        ),
        (
            "an empty group",
            "empty-group",
            pb::JobSpec {
                param_groups: vec![group(&["w", "b", "e"], None), group(&[], None)],
                ..spec()
            },
            vec!["param_groups[1].params", "empty"],
        ),
        (
            "no parameters",
            "no-params",
            pb::JobSpec {
                params: Vec::new(),
                ..spec()
            },
            vec!["params is empty"],
        ),
        (
            "a parameter declared twice",
            "dup-param",
            pb::JobSpec {
                params: vec![
                    param("w", &[2, 3]),
                    param("b", &[]),
                    param("e", &[4]),
                    param("w", &[2, 3]),
                ],
                ..spec()
            },
            vec!["'w'", "declared twice", "params[0]", "params[3]"],
        ),
        (
            "a parameter without a name",
            "unnamed-param",
            pb::JobSpec {
                params: vec![param("w", &[2, 3]), param("", &[]), param("e", &[4])],
                ..spec()
            },
            vec!["params[1].name", "empty"],
        ),
        (
            "zero workers",
            "zero-workers",
            pb::JobSpec {
                workers: 0,
                ..spec()
            },
            vec!["workers", "got 0"],
        ),
        (
            "too many workers",
            "many-workers",
            pb::JobSpec {
                workers: 65537,
                ..spec()
            },
            vec!["workers", "65536", "got 65537"],
        ),
        (
            "no optimizer kind",
            "kind-unspecified",
            adam_spec(Unspecified, hyper()),
            vec!["optimizer.kind", "required"],
        ),
        (
            "an unknown optimizer kind",
            "kind-unknown",
            pb::JobSpec {
                optimizer: Some(pb::Optimizer {
                    kind: 42,
                    hyper: None,
                }),
                ..spec()
            },
            vec!["optimizer.kind", "42"],
        ),
        (
            "no optimizer",
            "no-optimizer",
            pb::JobSpec {
                optimizer: None,
                ..spec()
            },
            vec!["optimizer", "required"],
        ),
        (
            "momentum for Adam",
            "adam-momentum",
            adam_spec(
                Adam,
                pb::Hyperparameters {
                    momentum: Some(0.9),
                    ..hyper()
                },
            ),
            vec!["optimizer.momentum", "not an option of Adam"],
        ),
        (
            "nesterov for AdamW in a param group",
            "adamw-group-nesterov",
            pb::JobSpec {
                param_groups: vec![group(
                    &["w", "b", "e"],
                    Some(pb::Hyperparameters {
                        nesterov: Some(false),
                        ..hyper()
                    }),
                )],
                ..adam_spec(Adamw, hyper())
            },
            vec!["param_groups[0].nesterov", "not an option of AdamW"],
        ),
        (
            "amsgrad for SGD",
            "sgd-amsgrad",
            sgd_spec(pb::Hyperparameters {
                amsgrad: Some(false),
                ..lr(LR)
            }),
            vec!["optimizer.amsgrad", "not an option of SGD"],
        ),
        (
            "an unknown non_finite policy",
            "policy-unknown",
            pb::JobSpec {
                non_finite: 7,
                ..spec()
            },
            vec!["non_finite", "7"],
        ),
        (
            "a job name with a slash",
            "a/b",
            spec(),
            vec!["job name", "\"a/b\""],
        ),
        (
            "a job name with a space",
            "a b",
            spec(),
            vec!["job name", "\"a b\""],
        ),
        (
            "a job name of 129 characters",
            &long_name,
            spec(),
            vec!["job name", "128"],
        ),
    ];

    for (what, job, bad, parts) in cases {
        let msg = refused(
            client.init(job, bad, &refs(&initial())).await,
            Code::InvalidArgument,
            &parts,
            what,
        );
        assert!(!msg.is_empty(), "{what}: a message");
        assert_absent(&mut client, job, what).await;
    }
    // An empty job name is refused too; Status with an empty name lists
    // every job, so it is checked by the list below.
    refused(
        client.init("", spec(), &refs(&initial())).await,
        Code::InvalidArgument,
        &["job name", "\"\""],
        "an empty job name",
    );
    let all = client.status(None).await.expect("status");
    assert!(
        all.jobs.is_empty(),
        "refused Inits created jobs: {:?}",
        all.jobs
    );

    // Not vacuous: the unchanged spec is accepted and then found.
    create(&mut client, "neg-lr", spec()).await;
    assert_eq!(job_status(&mut client, "neg-lr").await.round, 0);
    let all = client.status(None).await.expect("status");
    assert_eq!(all.jobs.len(), 1);
    drop(client);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_misshapen_initial_values_are_refused_naming_the_parameter() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let good = initial();
    let with = |name: &'static str, values: Vec<f32>| -> Tensors {
        good.iter()
            .map(|(n, v)| {
                (
                    *n,
                    if *n == name {
                        values.clone()
                    } else {
                        v.clone()
                    },
                )
            })
            .collect()
    };
    let without =
        |name: &str| -> Tensors { good.iter().filter(|(n, _)| *n != name).cloned().collect() };
    let mut unknown = good.clone();
    unknown.push(("z", vec![1.0]));
    let mut twice = good.clone();
    twice.push(("e", vec![1.0, 2.0, 3.0, 4.0]));

    let cases: Vec<(&str, Tensors, Vec<&str>)> = vec![
        (
            "no values at all",
            Vec::new(),
            vec!["'w'", "missing", "24 bytes"],
        ),
        (
            "no value for the scalar",
            without("b"),
            vec!["'b'", "missing", "4 bytes"],
        ),
        (
            "no value for e",
            without("e"),
            vec!["'e'", "missing", "16 bytes"],
        ),
        (
            "5 values for w [2, 3]",
            with("w", vec![1.0; 5]),
            vec!["'w'", "24 bytes", "20"],
        ),
        (
            "7 values for w [2, 3]",
            with("w", vec![1.0; 7]),
            vec!["'w'", "24 bytes", "28"],
        ),
        (
            "2 values for the scalar b",
            with("b", vec![1.0, 2.0]),
            vec!["'b'", "4 bytes", "8"],
        ),
        (
            "no element for the scalar b",
            with("b", Vec::new()),
            vec!["'b'", "missing"],
        ),
        (
            "a value for an unknown parameter",
            unknown,
            vec!["unknown parameter 'z'"],
        ),
        ("e sent twice", twice, vec!["'e'", "twice"]),
    ];
    for (i, (what, values, parts)) in cases.into_iter().enumerate() {
        let job = format!("values-{i}");
        let mut parts = parts;
        parts.push("initial values");
        refused(
            client.init(&job, spec(), &refs(&values)).await,
            Code::InvalidArgument,
            &parts,
            what,
        );
        assert_absent(&mut client, &job, what).await;
    }

    // Not vacuous: the same spec with good values is created, holding them.
    create(&mut client, "values-0", spec()).await;
    let pulled = client.pull("values-0", 0).await.expect("pull");
    assert!(pulled.last.is_none(), "no outcome before the first round");
    let got: Params = pulled.params.into_iter().collect();
    assert_eq!(bits(&got), bits(&as_params(&good)));
    drop(client);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_of_an_existing_job_must_repeat_its_spec() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let job = "existing";
    create(&mut client, job, spec()).await;
    let p0 = run_round(&mut client, job, 0, 1, &as_params(&initial())).await;
    let before = seen(&mut client, job).await;
    assert_eq!((before.round, before.step), (1, 1));

    let mut extra = spec();
    extra.params.push(param("f", &[2]));
    let cases: Vec<(&str, pb::JobSpec, Vec<&str>)> = vec![
        (
            "more workers",
            pb::JobSpec {
                workers: 3,
                ..spec()
            },
            vec!["workers is 2 here, 3 in the request"],
        ),
        (
            "a different shape",
            pb::JobSpec {
                params: vec![param("w", &[3, 2]), param("b", &[]), param("e", &[4])],
                ..spec()
            },
            vec!["params[0]", "'w' [2, 3] here", "'w' [3, 2] in the request"],
        ),
        (
            "a renamed parameter",
            pb::JobSpec {
                params: vec![param("w", &[2, 3]), param("bias", &[]), param("e", &[4])],
                ..spec()
            },
            vec!["params[1]", "'b'", "'bias'"],
        ),
        (
            "one more parameter",
            extra,
            vec!["3 params here, 4 in the request"],
        ),
        (
            "another lr",
            sgd_spec(lr(0.2)),
            vec!["param group 0", "lr: 0.1", "lr: 0.2", "in the request"],
        ),
        (
            "another optimizer",
            adam_spec(pb::OptimizerKind::Adam, lr(LR)),
            vec!["param group 0", "Sgd(", "Adam(", "in the request"],
        ),
        (
            "a clip",
            pb::JobSpec {
                clip: Some(pb::Clip { max_norm: 1.0 }),
                ..spec()
            },
            vec!["clip max_norm is None here, Some(1.0) in the request"],
        ),
        (
            "a schedule",
            pb::JobSpec {
                schedule: Some(pb::Schedule {
                    kind: Some(pb::schedule::Kind::CosineAnnealing(pb::CosineAnnealing {
                        t_max: 10,
                        eta_min: 0.0,
                    })),
                }),
                ..spec()
            },
            vec!["schedule is Constant here, CosineAnnealing"],
        ),
        (
            "another non_finite policy",
            pb::JobSpec {
                non_finite: pb::NonFinitePolicy::Error as i32,
                ..spec()
            },
            vec!["non_finite is Skip here, Error in the request"],
        ),
    ];
    for (what, other, parts) in cases {
        let mut parts = parts;
        parts.extend([
            "'existing'",
            "already exists with a different configuration",
        ]);
        refused(
            client.init(job, other, &refs(&initial())).await,
            Code::FailedPrecondition,
            &parts,
            what,
        );
        assert_eq!(
            seen(&mut client, job).await,
            before,
            "{what}: the job is unchanged"
        );
    }

    // The same spec again: found, at its current round, values untouched
    // (they are not even read: these would be refused on a new job).
    let again = client
        .init(job, spec(), &refs(&initial()))
        .await
        .expect("same spec");
    assert!(!again.created, "same spec: not created again");
    assert_eq!(again.round, 1, "same spec: the current round");
    let short: Tensors = vec![("w", vec![9.0; 2])];
    let again = client
        .init(job, spec(), &refs(&short))
        .await
        .expect("same spec, other values");
    assert_eq!((again.created, again.round), (false, 1));
    // Defaults spelled out describe the same job.
    let spelled = sgd_spec(pb::Hyperparameters {
        momentum: Some(0.0),
        dampening: Some(0.0),
        weight_decay: Some(0.0),
        nesterov: Some(false),
        ..lr(LR)
    });
    let again = client
        .init(job, spelled, &refs(&initial()))
        .await
        .expect("defaults spelled out");
    assert_eq!((again.created, again.round), (false, 1));
    assert_eq!(
        seen(&mut client, job).await,
        before,
        "repeated Inits changed the job"
    );

    // The job still runs normally from where it was.
    run_round(&mut client, job, 1, 2, &p0).await;
    let again = client.init(job, spec(), &[]).await.expect("same spec");
    assert_eq!((again.created, again.round), (false, 2));
    drop(client);
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// Push.

/// A push that must be refused whole.
struct BadPush {
    what: &'static str,
    job: String,
    worker: u32,
    round: u64,
    grads: Vec<pb::Segment>,
    code: Code,
    parts: Vec<String>,
}

/// Every refused push, as worker `worker` would send it during `round`
/// (>= 2) of job `job`.
fn bad_pushes(job: &str, round: u64, worker: u32) -> Vec<BadPush> {
    let good = grads(worker, round);
    let w = get(&good, "w").to_vec();
    let e = get(&good, "e").to_vec();
    let with_w = |w: Vec<pb::Segment>| -> Vec<pb::Segment> {
        let mut s = w;
        s.extend(segments_without(&good, "w"));
        s
    };
    let case = |what, grads, code, parts: &[&str]| BadPush {
        what,
        job: job.to_owned(),
        worker,
        round,
        grads,
        code,
        parts: parts.iter().map(|p| (*p).to_owned()).collect(),
    };
    let invalid = Code::InvalidArgument;
    let mut unknown = segments(&good);
    unknown.push(segment("z", 0, &[1.0]));
    let mut e_past_end = segments(&good);
    e_past_end.push(segment("e", 4, &[1.0]));
    let mut b_twice = segments(&good);
    b_twice.push(segment("b", 0, &[1.0]));
    let odd = pb::Segment {
        param: "w".to_owned(),
        offset: 0,
        data: Bytes::from(vec![0u8; 7]),
    };

    let stale = round - 1;
    let early = round + 1;
    vec![
        case(
            "an unknown parameter",
            unknown,
            invalid,
            &["unknown parameter 'z'"],
        ),
        case(
            "5 floats for w [2, 3]",
            with_w(vec![segment("w", 0, &w[..5])]),
            invalid,
            &["'w'", "24 bytes", "20"],
        ),
        case(
            "7 floats for w [2, 3]",
            with_w(vec![segment("w", 0, &[w.clone(), vec![1.0]].concat())]),
            invalid,
            &["'w'", "24 bytes", "28"],
        ),
        case(
            "2 floats for the scalar b",
            {
                let mut s = segments_without(&good, "b");
                s.push(segment("b", 0, &[1.0, 2.0]));
                s
            },
            invalid,
            &["'b'", "4 bytes", "8"],
        ),
        case(
            "w with a hole",
            with_w(vec![segment("w", 0, &w[..2]), segment("w", 3, &w[3..])]),
            invalid,
            &["'w'", "24 bytes", "20"],
        ),
        case(
            "an element past the end of e",
            e_past_end,
            invalid,
            &["'e'", "16 bytes"],
        ),
        case(
            "7 bytes for w",
            with_w(vec![odd]),
            invalid,
            &["'w'", "7 bytes", "multiple of 4"],
        ),
        case(
            "w sent twice",
            with_w(vec![segment("w", 0, &w), segment("w", 0, &w)]),
            invalid,
            &["'w'", "sent twice"],
        ),
        case(
            "overlapping pieces of e",
            {
                let mut s = segments_without(&good, "e");
                s.push(segment("e", 0, &e[..3]));
                s.push(segment("e", 2, &e[2..]));
                s
            },
            invalid,
            &["'e'", "sent twice"],
        ),
        case(
            "the scalar b sent twice",
            b_twice,
            invalid,
            &["'b'", "sent twice"],
        ),
        case(
            "b missing",
            segments_without(&good, "b"),
            invalid,
            &["'b'", "missing"],
        ),
        case(
            "e missing",
            segments_without(&good, "e"),
            invalid,
            &["'e'", "missing", "16 bytes"],
        ),
        case("nothing at all", Vec::new(), invalid, &["'w'", "missing"]),
        BadPush {
            worker: 2,
            ..case(
                "worker 2 of 2",
                segments(&good),
                invalid,
                &["worker 2", "2 workers"],
            )
        },
        BadPush {
            worker: u32::MAX,
            ..case(
                "worker u32::MAX",
                segments(&good),
                invalid,
                &["worker 4294967295", "2 workers"],
            )
        },
        BadPush {
            round: stale,
            ..case(
                "the previous round",
                segments(&good),
                Code::FailedPrecondition,
                &[
                    "stale",
                    &format!("round {stale} "),
                    &format!("current round is {round}"),
                ],
            )
        },
        BadPush {
            round: 0,
            ..case(
                "round 0",
                segments(&good),
                Code::FailedPrecondition,
                &["stale", "round 0 ", &format!("current round is {round}")],
            )
        },
        BadPush {
            round: early,
            ..case(
                "the next round",
                segments(&good),
                Code::FailedPrecondition,
                &[
                    "early",
                    &format!("collecting round {round}"),
                    &format!("not round {early}"),
                ],
            )
        },
        BadPush {
            round: u64::MAX,
            ..case(
                "round u64::MAX",
                segments(&good),
                Code::FailedPrecondition,
                &["early", &format!("collecting round {round}")],
            )
        },
        BadPush {
            job: "no-such-job".to_owned(),
            ..case(
                "an unknown job",
                segments(&good),
                Code::NotFound,
                &["'no-such-job'", "does not exist"],
            )
        },
    ]
}

/// Every bad push, once before any worker pushed its round and once after
/// worker 0 did: refused, and counted for nothing, so the round still needs
/// both workers' legitimate pushes and applies exactly their mean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_pushes_are_refused_whole_and_count_for_nothing() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut raw = ParamServerClient::connect(server.url())
        .await
        .expect("connect");
    let job = "pushes";
    create(&mut client, job, spec()).await;

    // Two rounds first, so that parameters and counters are not initial.
    let mut params = as_params(&initial());
    for round in 0..2 {
        params = run_round(&mut client, job, round, round + 1, &params).await;
    }
    assert_ne!(bits(&params), bits(&as_params(&initial())));

    let mut round = 2;
    let cases = bad_pushes(job, round, 0).len();
    for other_first in [false, true] {
        for i in 0..cases {
            // The bad push comes from worker 1 after worker 0's push, or
            // from worker 0 before any.
            let bad_worker = u32::from(other_first);
            if other_first {
                push_ok(&mut client, job, 0, round, &grads(0, round), 1).await;
            }
            let before = seen(&mut client, job).await;
            assert_eq!(before.round, round);
            assert_eq!(before.workers_pushed, u32::from(other_first));
            assert_eq!(bits(&params), before.params);

            let bad = bad_pushes(job, round, bad_worker).swap_remove(i);
            let what = format!(
                "{} (round {round}, {})",
                bad.what,
                if other_first {
                    "after worker 0"
                } else {
                    "first"
                }
            );
            match raw_push(&mut raw, &bad.job, bad.worker, bad.round, bad.grads).await {
                Ok(r) => panic!("{what}: accepted: {r:?}"),
                Err(s) => check_status(&s, bad.code, &bad.parts, &what),
            }
            assert_eq!(
                seen(&mut client, job).await,
                before,
                "{what}: the refused push changed the job"
            );

            // Both legitimate pushes are still needed, and counted as new.
            if !other_first {
                push_ok(&mut client, job, 0, round, &grads(0, round), 1).await;
                let s = job_status(&mut client, job).await;
                assert_eq!(
                    (s.round, s.workers_pushed),
                    (round, 1),
                    "{what}: one push is not a round"
                );
            }
            push_ok(&mut client, job, 1, round, &grads(1, round), 2).await;
            params = check_applied(&mut client, job, round, round + 1, &params).await;
            round += 1;
        }
    }
    assert_eq!(round, 2 + 2 * cases as u64);
    drop((client, raw));
    server.shutdown().await;
}

/// A segment offset near `u64::MAX` must be refused like any element past
/// the end. Today `offset + n` and `(offset + n) * 4` overflow in
/// `Target::split` (server/src/pieces.rs): in a debug build the handler
/// panics, in a release build `u64::MAX` wraps past the bounds check and
/// `cut` panics indexing the layout; the client sees CANCELLED "h2 protocol
/// error" instead of INVALID_ARGUMENT, and with `1 << 62` a release build
/// reports "(up to byte 4)".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_segment_offset_is_refused() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut raw = ParamServerClient::connect(server.url())
        .await
        .expect("connect");
    let job = "huge-offset";
    create(&mut client, job, spec()).await;
    let params = run_round(&mut client, job, 0, 1, &as_params(&initial())).await;
    let before = seen(&mut client, job).await;
    for offset in [1 << 62, u64::MAX - 1, u64::MAX] {
        let what = format!("push with e at offset {offset}");
        let mut grads = segments(&grads(0, 1));
        grads.push(segment("e", offset, &[1.0]));
        match raw_push(&mut raw, job, 0, 1, grads).await {
            Ok(r) => panic!("{what}: accepted: {r:?}"),
            Err(s) => check_status(
                &s,
                Code::InvalidArgument,
                &["'e'".to_owned(), "16 bytes".to_owned()],
                &what,
            ),
        }
        assert_eq!(
            seen(&mut client, job).await,
            before,
            "{what}: the job changed"
        );

        let what = format!("init with e at offset {offset}");
        let name = format!("huge-offset-init-{offset}");
        let mut values = segments(&initial());
        values.push(segment("e", offset, &[1.0]));
        let req = pb::InitRequest {
            job: name.clone(),
            spec: Some(spec()),
            values,
        };
        match raw.init(tokio_stream::iter(vec![req])).await {
            Ok(r) => panic!("{what}: accepted: {r:?}"),
            Err(s) => check_status(
                &s,
                Code::InvalidArgument,
                &["'e'".to_owned(), "16 bytes".to_owned()],
                &what,
            ),
        }
        assert_absent(&mut client, &name, &what).await;
    }
    run_round(&mut client, job, 1, 2, &params).await;
    drop((client, raw));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_push_is_counted_once() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let job = "retries";
    create(&mut client, job, spec()).await;
    let params = run_round(&mut client, job, 0, 1, &as_params(&initial())).await;

    let round = 1;
    push_ok(&mut client, job, 0, round, &grads(0, round), 1).await;
    let before = seen(&mut client, job).await;
    // The same push again, then a "retry" with other gradients: both are
    // acknowledged as duplicates, and the first push's gradients are kept.
    for (what, g) in [
        ("same gradients", grads(0, round)),
        ("other gradients", grads(0, 7)),
    ] {
        let r = client.push(job, 0, round, &refs(&g)).await.expect(what);
        assert!(r.duplicate, "{what}: a duplicate");
        assert_eq!(r.pushed, 1, "{what}: still one worker counted");
        assert_eq!(
            seen(&mut client, job).await,
            before,
            "{what}: the retry changed the job"
        );
    }
    push_ok(&mut client, job, 1, round, &grads(1, round), 2).await;
    let params = check_applied(&mut client, job, round, 2, &params).await;

    // A retry that arrives once its round is complete is stale.
    refused(
        client.push(job, 0, round, &refs(&grads(0, round))).await,
        Code::FailedPrecondition,
        &["stale", "current round is 2"],
        "a retry after the round completed",
    );
    run_round(&mut client, job, 2, 3, &params).await;
    drop(client);
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// Non-finite gradients.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_error_policy_refuses_a_non_finite_push() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let job = "nan-error";
    let spec = pb::JobSpec {
        non_finite: pb::NonFinitePolicy::Error as i32,
        ..spec()
    };
    create(&mut client, job, spec).await;
    let params = run_round(&mut client, job, 0, 1, &as_params(&initial())).await;

    let round = 1;
    push_ok(&mut client, job, 0, round, &grads(0, round), 1).await;
    let before = seen(&mut client, job).await;
    let poisoned = |name: &str, i: usize, v: f32| -> Tensors {
        let mut g = grads(1, round);
        let t = g.iter_mut().find(|(n, _)| *n == name).expect("tensor");
        t.1[i] = v;
        g
    };
    let cases = [
        (
            "NaN in e",
            poisoned("e", 2, f32::NAN),
            vec!["'e'", "element 2", "NaN", "non-finite"],
        ),
        (
            "-inf in the scalar b",
            poisoned("b", 0, f32::NEG_INFINITY),
            vec!["'b'", "element 0", "-inf"],
        ),
        (
            "+inf in w",
            poisoned("w", 5, f32::INFINITY),
            vec!["'w'", "element 5", "inf"],
        ),
    ];
    for (what, g, parts) in cases {
        refused(
            client.push(job, 1, round, &refs(&g)).await,
            Code::InvalidArgument,
            &parts,
            what,
        );
        assert_eq!(
            seen(&mut client, job).await,
            before,
            "{what}: the refused push changed the job"
        );
    }
    push_ok(&mut client, job, 1, round, &grads(1, round), 2).await;
    check_applied(&mut client, job, round, 2, &params).await;
    let s = job_status(&mut client, job).await;
    assert_eq!(s.rounds_skipped, 0);
    drop(client);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_skip_policy_skips_a_non_finite_round() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let job = "nan-skip";
    create(&mut client, job, spec()).await;
    let params = run_round(&mut client, job, 0, 1, &as_params(&initial())).await;
    let before = seen(&mut client, job).await;
    assert_eq!(
        (before.round, before.step, before.rounds_skipped),
        (1, 1, 0)
    );

    // Round 1: one NaN element in one worker's w spoils the mean, and the
    // round is skipped everywhere, b and e included.
    let round = 1;
    let mut g1 = grads(1, round);
    g1[0].1[3] = f32::NAN;
    push_ok(&mut client, job, 0, round, &grads(0, round), 1).await;
    push_ok(&mut client, job, 1, round, &g1, 2).await;
    let (got, last) = pull(&mut client, job, 2).await;
    assert_eq!(
        bits(&got),
        bits(&params),
        "a skipped round changes no parameter"
    );
    assert!(last.skipped, "the round is reported skipped");
    assert_eq!(
        (last.round, last.step),
        (1, 1),
        "a skipped round is not a step"
    );
    let s = job_status(&mut client, job).await;
    assert_eq!(
        (s.round, s.step, s.rounds_skipped, s.workers_pushed),
        (2, 1, 1, 0)
    );
    let l = s.last.expect("last outcome");
    assert!(l.skipped);
    assert_eq!((l.round, l.step), (1, 1));

    // Round 2 is finite: one normal step, the step counter advances by one.
    let round = 2;
    push_ok(&mut client, job, 0, round, &grads(0, round), 1).await;
    push_ok(&mut client, job, 1, round, &grads(1, round), 2).await;
    check_applied(&mut client, job, round, 2, &params).await;
    let s = job_status(&mut client, job).await;
    assert_eq!(s.rounds_skipped, 1, "one skipped round so far");
    assert!(!s.last.expect("last outcome").skipped);
    drop(client);
    server.shutdown().await;
}
