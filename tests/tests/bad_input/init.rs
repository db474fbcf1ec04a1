//! Init: bad configurations and initial values, and repeated Inits.

use paramd_client::v1 as pb;
use paramd_tests::TestServer;
use tonic::Code;

use crate::checks::{assert_absent, create, job_status, refused, run_round, seen};
use crate::fixtures::{
    adam_spec, as_params, bits, group, initial, lr, param, refs, sgd_spec, spec,
};
use crate::{LR, Params, Tensors};

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
            vec!["'w'", "missing", "6 elements"],
        ),
        (
            "no value for the scalar",
            without("b"),
            vec!["'b'", "missing", "1 elements"],
        ),
        (
            "no value for e",
            without("e"),
            vec!["'e'", "missing", "4 elements"],
        ),
        (
            "5 values for w [2, 3]",
            with("w", vec![1.0; 5]),
            vec!["'w'", "6 elements", "got 5"],
        ),
        (
            "7 values for w [2, 3]",
            with("w", vec![1.0; 7]),
            vec!["'w'", "6 elements", "got 7"],
        ),
        (
            "2 values for the scalar b",
            with("b", vec![1.0, 2.0]),
            vec!["'b'", "1 elements", "got 2"],
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
