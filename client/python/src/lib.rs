//! `paramd._native`: the Rust client (`paramd-client`) as the core of the
//! Python package. `paramd.Client` keeps its Python API and calls this for
//! every RPC, so Python, `paramctl` and Rust programs share one
//! implementation of the protocol: layout routing, header-first pushes,
//! every shard reached at once, one retry policy, pulls that never mix
//! rounds.
//!
//! Tensors cross the boundary without copies: a push reads the gradients
//! straight from the memory of the arrays it is given (the buffer
//! protocol: numpy arrays, and CPU torch tensors through `.numpy()`), and a
//! pull writes straight into the arrays it is given (the parameters'
//! memory). The GIL is released for the whole network part.
//!
//! Control messages (a job's spec, layout, status, a round's outcome)
//! cross as encoded protobuf, which the package reads with its generated
//! message classes.

// Lending Python buffers to the client is the one unsafe step: see
// `lend`. The client's `memory` module holds the reasoning.
#![allow(unsafe_code)]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use paramd_client::codec::{Payload, Target};
use paramd_client::memory::{Dest, LeaseGuard, Lent, Source};
use paramd_client::{
    Client as Rust, ClientError, Credentials, ParamState, PullInto, PushOptions,
    PushStream as RustPushStream, v1 as pb,
};
use prost::Message;
use pyo3::buffer::PyBuffer;
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

create_exception!(
    _native,
    RpcError,
    PyException,
    "A failed call: args are (gRPC code as an int or None, message, shard or None, url or None, the server's reason or None)."
);

/// The runtime every client of the process shares: a few threads, since
/// the work is moving bytes between sockets and memory.
fn runtime() -> PyResult<&'static tokio::runtime::Runtime> {
    static RT: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RT.get_or_init(|| {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 4));
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("paramd-client")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the client's runtime: {e}"))
    })
    .as_ref()
    .map_err(|e| PyException::new_err(e.clone()))
}

fn error(e: ClientError) -> PyErr {
    let reason = e.reason().map(str::to_owned);
    let (code, message, shard, url) = match &e {
        ClientError::Status(s) => (Some(s.code() as i32), s.message().to_owned(), None, None),
        ClientError::Shard { shard, url, status } => (
            Some(status.code() as i32),
            status.message().to_owned(),
            Some(*shard),
            Some(url.clone()),
        ),
        ClientError::Connect { .. } => (
            Some(tonic::Code::Unavailable as i32),
            e.to_string(),
            None,
            None,
        ),
        ClientError::Invalid(m) => (None, m.clone(), None, None),
    };
    RpcError::new_err((code, message, shard, url, reason))
}

/// A contiguous f32 buffer of `obj`, named `name` in errors.
fn buffer<T: pyo3::buffer::Element>(
    name: &str,
    obj: &Bound<'_, PyAny>,
    writable: bool,
) -> PyResult<PyBuffer<T>> {
    let buf = PyBuffer::<T>::get(obj).map_err(|e| {
        PyValueError::new_err(format!(
            "tensor '{name}': not a {} buffer ({e})",
            std::any::type_name::<T>()
        ))
    })?;
    if !buf.is_c_contiguous() {
        return Err(PyValueError::new_err(format!(
            "tensor '{name}': not contiguous"
        )));
    }
    if writable && buf.readonly() {
        return Err(PyValueError::new_err(format!(
            "tensor '{name}': read-only, cannot pull into it"
        )));
    }
    Ok(buf)
}

/// The wire dtype a Python caller names ("f32", "bf16" or "f16").
fn wire_dtype(name: &str) -> PyResult<pb::Dtype> {
    match name {
        "f32" => Ok(pb::Dtype::F32),
        "bf16" => Ok(pb::Dtype::Bf16),
        "f16" => Ok(pb::Dtype::F16),
        _ => Err(PyValueError::new_err(format!(
            "wire dtype must be 'f32', 'bf16' or 'f16', got {name:?}"
        ))),
    }
}

/// Checks that names and arrays pair up.
fn pairs<'a, 'py>(
    names: &'a [String],
    arrays: &'a [Bound<'py, PyAny>],
) -> PyResult<impl Iterator<Item = (&'a String, &'a Bound<'py, PyAny>)>> {
    if names.len() != arrays.len() {
        return Err(PyValueError::new_err(format!(
            "{} names for {} arrays",
            names.len(),
            arrays.len()
        )));
    }
    Ok(names.iter().zip(arrays))
}

/// Lends the memory of `buf` under `guard`'s lease.
///
/// SAFETY (of the unsafe blocks): the caller keeps `buf` (and so the
/// exporter's memory, which a held buffer pins) alive until `guard` is
/// dropped, which ends the lease before the buffers are released (see
/// `Client::push` and `Client::pull_into`). Python code running meanwhile
/// in other threads must not write the arrays being pushed or touch those
/// being pulled into, as with any C extension that releases the GIL.
fn lend_source<T: pyo3::buffer::Element>(buf: &PyBuffer<T>, guard: &LeaseGuard) -> Payload {
    let source = unsafe { Source::from_raw(buf.buf_ptr().cast_const().cast(), buf.len_bytes()) };
    Payload::Lent(Lent::new(source, guard.lease()))
}

fn lend_dest(buf: &PyBuffer<f32>, guard: &LeaseGuard) -> Target {
    let dest = unsafe { Dest::from_raw(buf.buf_ptr().cast(), buf.len_bytes()) };
    Target::Lent(Lent::new(dest, guard.lease()))
}

/// A connection to a paramd server or cluster.
#[pyclass(frozen, module = "paramd._native")]
struct Client {
    inner: Rust,
}

impl Client {
    /// Runs `f` on the runtime with the GIL released.
    fn run<T, F>(&self, py: Python<'_>, f: impl FnOnce(Rust) -> F + Send) -> PyResult<T>
    where
        F: std::future::Future<Output = Result<T, ClientError>> + Send,
        T: Send,
    {
        let rt = runtime()?;
        let client = self.inner.clone();
        py.detach(|| rt.block_on(f(client))).map_err(error)
    }
}

#[pymethods]
impl Client {
    /// `url` is `http://host:port` or `https://host:port`; `ca_cert`,
    /// `cert` and `key` are PEM bytes (no `ca_cert`: the system's roots).
    #[new]
    #[pyo3(signature = (url, token=None, ca_cert=None, cert=None, key=None, timeout=300.0, retries=None))]
    fn new(
        url: &str,
        token: Option<&str>,
        ca_cert: Option<Vec<u8>>,
        cert: Option<Vec<u8>>,
        key: Option<Vec<u8>>,
        timeout: f64,
        retries: Option<u32>,
    ) -> PyResult<Client> {
        let mut credentials = Credentials::none();
        if let Some(t) = token {
            credentials = credentials.with_token(t).map_err(PyValueError::new_err)?;
        }
        if url.starts_with("https://") {
            let identity = cert.zip(key);
            credentials = credentials
                .with_tls_pem(ca_cert, identity)
                .map_err(PyValueError::new_err)?;
        }
        if !(timeout.is_finite() && timeout > 0.0) {
            return Err(PyValueError::new_err(format!(
                "timeout must be > 0 seconds, got {timeout}"
            )));
        }
        let _rt = runtime()?.enter();
        let mut inner = Rust::lazy(url, credentials).map_err(error)?;
        inner.timeout = Duration::from_secs_f64(timeout);
        inner.retries = retries;
        Ok(Client { inner })
    }

    /// The encoded `LayoutResponse` of `job`.
    fn layout<'py>(&self, py: Python<'py>, job: String) -> PyResult<Bound<'py, PyBytes>> {
        let r = self.run(py, |c| async move { c.layout(&job).await })?;
        Ok(PyBytes::new(py, &r.encode_to_vec()))
    }

    /// The encoded layout of `job` the client routes by (fetched once).
    fn route_layout<'py>(&self, py: Python<'py>, job: String) -> PyResult<Bound<'py, PyBytes>> {
        let r = self.run(py, |c| async move { c.route_layout(&job).await })?;
        Ok(PyBytes::new(py, &r.encode_to_vec()))
    }

    /// Creates or finds `job` with the encoded `JobSpec` and initial values;
    /// returns (round, created).
    fn init(
        &self,
        py: Python<'_>,
        job: String,
        spec: &[u8],
        names: Vec<String>,
        values: Vec<Bound<'_, PyAny>>,
    ) -> PyResult<(u64, bool)> {
        let spec =
            pb::JobSpec::decode(spec).map_err(|e| PyValueError::new_err(format!("spec: {e}")))?;
        // Init happens once per job: a copy of the values is fine here.
        let mut owned = Vec::with_capacity(names.len());
        for (name, v) in pairs(&names, &values)? {
            owned.push((name.as_str(), buffer(name, v, false)?.to_vec(py)?));
        }
        let r = self.run(py, |mut c| async move {
            let values: Vec<(&str, &[f32])> =
                owned.iter().map(|(n, v)| (*n, v.as_slice())).collect();
            c.init(&job, spec, &values).await
        })?;
        Ok((r.round, r.created))
    }

    /// Pushes worker `worker`'s gradients for `round`, read straight from
    /// the arrays; returns (duplicate, pushed). Every parameter of the job
    /// must be given, with its size, or named in `no_grad` (no gradient,
    /// torch's `grad is None`): checked before anything is sent.
    /// `dtype` is how the float32 arrays travel: "f32", or "bf16" or "f16"
    /// (cast here, rounded to nearest even, as torch's `.to()` casts).
    /// `weight`: the push's weight in a job whose merge is weighted (0 in
    /// one that merges by mean). `lease`: an elastic job's member pushes
    /// with the lease `join` gave it (0 in a job of fixed workers).
    #[pyo3(signature = (job, worker, round, names, grads, no_grad = Vec::new(), dtype = "f32", weight = 0.0, lease = 0))]
    #[allow(clippy::too_many_arguments)]
    fn push(
        &self,
        py: Python<'_>,
        job: String,
        worker: u32,
        round: u64,
        names: Vec<String>,
        grads: Vec<Bound<'_, PyAny>>,
        no_grad: Vec<String>,
        dtype: &str,
        weight: f32,
        lease: u64,
    ) -> PyResult<(bool, u32)> {
        let dtype = wire_dtype(dtype)?;
        let guard = LeaseGuard::new();
        let mut bufs = Vec::with_capacity(names.len());
        for (name, g) in pairs(&names, &grads)? {
            bufs.push(buffer::<f32>(name, g, false)?);
        }
        let sizes: Vec<(String, usize)> = names
            .iter()
            .zip(&bufs)
            .map(|(n, b)| (n.clone(), b.item_count()))
            .collect();
        let payloads: Vec<(Arc<str>, Payload)> = if dtype == pb::Dtype::F32 {
            names
                .iter()
                .zip(&bufs)
                .map(|(n, b)| (Arc::from(n.as_str()), lend_source(b, &guard)))
                .collect()
        } else {
            // Cast (rounded to nearest even) without the GIL, into bytes of
            // the push's own.
            let slices: Vec<&[f32]> = bufs
                .iter()
                // SAFETY: a held buffer pins its exporter's memory, C
                // contiguous and f32-aligned (checked by `buffer`), for as
                // long as `bufs` lives; nothing writes it meanwhile (see
                // `lend_source`).
                .map(|b| unsafe {
                    std::slice::from_raw_parts(b.buf_ptr().cast::<f32>(), b.item_count())
                })
                .collect();
            let encoded = py.detach(|| {
                slices
                    .iter()
                    .map(|s| paramd_client::wire::encode(s, dtype))
                    .collect::<Vec<_>>()
            });
            names
                .iter()
                .zip(encoded)
                .map(|(n, e)| (Arc::from(n.as_str()), Payload::Owned(e)))
                .collect()
        };
        let what = format!("push of worker {worker} for round {round}");
        let r = self.run(py, |c| async move {
            let sizes: Vec<(&str, usize)> = sizes.iter().map(|(n, s)| (n.as_str(), *s)).collect();
            let absent: Vec<&str> = no_grad.iter().map(String::as_str).collect();
            c.check_push(&job, &what, &sizes, &absent).await?;
            let no_grad: Vec<Arc<str>> = no_grad.iter().map(|n| Arc::from(n.as_str())).collect();
            let options = PushOptions {
                dtype,
                weight,
                lease,
            };
            c.push_payloads(&job, worker, round, &payloads, &no_grad, options)
                .await
        });
        // The lease ends before the buffers are released.
        drop(guard);
        drop(bufs);
        let r = r?;
        Ok((r.duplicate, r.pushed))
    }

    /// Pulls the named parameters once `round` rounds are complete,
    /// writing straight into the arrays; returns (round, the encoded
    /// `RoundOutcome` of the last round or None). A pull that fails may
    /// have written part of the arrays.
    #[pyo3(signature = (job, round, names, outs, dtype = "f32"))]
    fn pull_into<'py>(
        &self,
        py: Python<'py>,
        job: String,
        round: u64,
        names: Vec<String>,
        outs: Vec<Bound<'py, PyAny>>,
        dtype: &str,
    ) -> PyResult<(u64, Option<Bound<'py, PyBytes>>)> {
        let dtype = wire_dtype(dtype)?;
        let mut bufs = Vec::with_capacity(names.len());
        for (name, o) in pairs(&names, &outs)? {
            bufs.push(buffer::<f32>(name, o, true)?);
        }
        let guard = LeaseGuard::new();
        let targets: Vec<PullInto> = names
            .iter()
            .zip(&bufs)
            .map(|(n, b)| PullInto {
                name: Arc::from(n.as_str()),
                target: lend_dest(b, &guard),
            })
            .collect();
        let r = self.run(py, |c| async move {
            c.pull_into_as(&job, round, &targets, dtype).await
        });
        drop(guard);
        drop(bufs);
        let (round, last) = r?;
        Ok((round, last.map(|l| PyBytes::new(py, &l.encode_to_vec()))))
    }

    /// The encoded `StatusResponse` of `job` ("" for every job).
    fn status<'py>(&self, py: Python<'py>, job: String) -> PyResult<Bound<'py, PyBytes>> {
        let r = self.run(py, |mut c| async move {
            c.status((!job.is_empty()).then_some(job.as_str())).await
        })?;
        Ok(PyBytes::new(py, &r.encode_to_vec()))
    }

    /// Joins elastic job `job`: (worker, lease, lease_seconds, round).
    fn join(&self, py: Python<'_>, job: String) -> PyResult<(u32, u64, f64, u64)> {
        let r = self.run(py, |c| async move { c.join(&job).await })?;
        Ok((r.worker, r.lease, r.lease_seconds, r.round))
    }

    /// Renews a membership's lease; returns the round being collected.
    fn heartbeat(&self, py: Python<'_>, job: String, worker: u32, lease: u64) -> PyResult<u64> {
        let r = self.run(
            py,
            |c| async move { c.heartbeat(&job, worker, lease).await },
        )?;
        Ok(r.round)
    }

    /// Ends a membership (harmless if it ended already).
    fn leave(&self, py: Python<'_>, job: String, worker: u32, lease: u64) -> PyResult<()> {
        self.run(py, |c| async move { c.leave(&job, worker, lease).await })
    }

    /// Sets the optimizer state of `job` before round `round`'s step (see
    /// `Client::load_state`): `params` is [(name, step, [(buffer,
    /// little-endian f32 bytes)])]. Returns the load's id.
    #[allow(clippy::type_complexity)]
    fn load_state(
        &self,
        py: Python<'_>,
        job: String,
        round: u64,
        step: u64,
        params: Vec<(String, u64, Vec<(String, Vec<u8>)>)>,
    ) -> PyResult<u64> {
        let mut state = std::collections::HashMap::new();
        for (name, step, buffers) in params {
            let mut out = std::collections::BTreeMap::new();
            for (buffer, bytes) in buffers {
                if bytes.len() % 4 != 0 {
                    return Err(PyValueError::new_err(format!(
                        "state: parameter '{name}' buffer '{buffer}': {} bytes is not whole float32 values",
                        bytes.len()
                    )));
                }
                let values = bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                out.insert(buffer, values);
            }
            state.insert(name, ParamState { step, buffers: out });
        }
        self.run(py, |c| async move {
            c.load_state(&job, round, step, &state).await
        })
    }

    /// The optimizer state of every parameter of `job` once `round` rounds
    /// are complete: (round, [(name, step, [(buffer, little-endian f32
    /// bytes)])]).
    #[allow(clippy::type_complexity)]
    fn state<'py>(
        &self,
        py: Python<'py>,
        job: String,
        round: u64,
    ) -> PyResult<(u64, Vec<(String, u64, Vec<(String, Bound<'py, PyBytes>)>)>)> {
        let r = self.run(py, |c| async move { c.state(&job, round).await })?;
        let params = r
            .params
            .into_iter()
            .map(|(name, p)| {
                let buffers = p
                    .buffers
                    .into_iter()
                    .map(|(b, v)| (b, PyBytes::new(py, &paramd_client::to_le_bytes(&v))))
                    .collect();
                (name, p.step, buffers)
            })
            .collect();
        Ok((r.round, params))
    }

    /// Checkpoints `job` ("" for every job); returns [(job, round)].
    fn checkpoint(&self, py: Python<'_>, job: String) -> PyResult<Vec<(String, u64)>> {
        let r = self.run(py, |mut c| async move {
            c.checkpoint((!job.is_empty()).then_some(job.as_str()))
                .await
        })?;
        Ok(r.into_iter().map(|j| (j.job, j.round)).collect())
    }

    /// Tries made again so far: (after UNAVAILABLE, after ABORTED).
    fn retried(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let r = &self.inner.retried;
        (r.unavailable.load(Relaxed), r.aborted.load(Relaxed))
    }

    /// Deletes `job` on every shard.
    fn delete_job(&self, py: Python<'_>, job: String) -> PyResult<()> {
        self.run(py, |mut c| async move { c.delete_job(&job).await })
    }

    /// Opens worker `worker`'s push for `round` of `job` on every shard;
    /// the gradients follow one at a time with `PushStream.send` (while
    /// backward still computes the others) and `PushStream.finish` ends it.
    fn push_start(
        &self,
        py: Python<'_>,
        job: String,
        worker: u32,
        round: u64,
    ) -> PyResult<PushStream> {
        let stream = self.run(
            py,
            |c| async move { c.push_stream(&job, worker, round).await },
        )?;
        Ok(PushStream {
            open: std::sync::Mutex::new(Some(Open {
                stream,
                guard: LeaseGuard::new(),
                buffers: Vec::new(),
            })),
        })
    }
}

/// What an open push holds: the stream, the lease of the memory it reads
/// and the buffers lent under it.
struct Open {
    stream: RustPushStream,
    guard: LeaseGuard,
    buffers: Vec<PyBuffer<f32>>,
}

impl Open {
    /// Ends the push's calls, then the lease (waiting for a read under
    /// way), then releases the buffers, in that order.
    fn close(self) {
        let Open {
            stream,
            guard,
            buffers,
        } = self;
        drop(stream);
        drop(guard);
        drop(buffers);
    }
}

/// A push sent tensor by tensor (see `Client.push_start`). Dropped without
/// `finish`, it is cut: no shard counts it.
#[pyclass(module = "paramd._native")]
struct PushStream {
    open: std::sync::Mutex<Option<Open>>,
}

impl PushStream {
    /// Runs `f` on the open push, refusing if it is finished.
    fn with_open<R>(&self, f: impl FnOnce(&mut Open) -> PyResult<R>) -> PyResult<R> {
        let mut open = self
            .open
            .lock()
            .map_err(|_| PyException::new_err("the push is broken"))?;
        let open = open
            .as_mut()
            .ok_or_else(|| PyValueError::new_err("the push is finished already"))?;
        f(open)
    }

    fn take(&self) -> PyResult<Open> {
        self.open
            .lock()
            .map_err(|_| PyException::new_err("the push is broken"))?
            .take()
            .ok_or_else(|| PyValueError::new_err("the push is finished already"))
    }
}

#[pymethods]
impl PushStream {
    /// Sends tensor `name` (a C-contiguous float32 buffer, read where it is
    /// until the push is finished: do not change it before). Refuses an
    /// unknown name, a wrong size or a tensor given twice.
    fn send(&self, name: &str, grad: &Bound<'_, PyAny>) -> PyResult<()> {
        let buf = buffer(name, grad, false)?;
        self.with_open(|open| {
            let payload = lend_source(&buf, &open.guard);
            open.stream.send(Arc::from(name), payload).map_err(error)?;
            open.buffers.push(buf);
            Ok(())
        })
    }

    /// Says that this worker has no gradient for parameter `name` (torch's
    /// `grad is None`) instead of sending one.
    fn no_grad(&self, name: &str) -> PyResult<()> {
        self.with_open(|open| open.stream.no_grad(Arc::from(name)).map_err(error))
    }

    /// Ends the push on every shard; returns (duplicate, workers pushed),
    /// as `Client.push` does.
    fn finish(&self, py: Python<'_>) -> PyResult<(bool, u32)> {
        let Open {
            stream,
            guard,
            buffers,
        } = self.take()?;
        let rt = runtime()?;
        let r = py.detach(|| rt.block_on(stream.finish()));
        drop(guard);
        drop(buffers);
        let r = r.map_err(error)?;
        Ok((r.duplicate, r.pushed))
    }

    /// Cuts the push (no shard counts it) and releases its buffers.
    fn cancel(&self) -> PyResult<()> {
        if let Ok(open) = self.take() {
            open.close();
        }
        Ok(())
    }
}

impl Drop for PushStream {
    fn drop(&mut self) {
        if let Ok(mut open) = self.open.lock()
            && let Some(open) = open.take()
        {
            open.close();
        }
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Client>()?;
    m.add_class::<PushStream>()?;
    m.add("RpcError", m.py().get_type::<RpcError>())?;
    Ok(())
}
