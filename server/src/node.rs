//! The jobs of one paramd process.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use paramd_proto::v1::Segment;

use crate::error::{Error, Result};
use crate::invalid;
use crate::job::Job;
use crate::layout::DEFAULT_CHUNK_BYTES;
use crate::spec::{JobConfig, validate_job_name};

/// Settings of a node that jobs and the service rely on.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Largest chunk of a parameter, in bytes.
    pub chunk_bytes: usize,
    /// Largest gRPC message decoded or encoded, in bytes.
    pub max_message_bytes: usize,
    /// Longest a pull waits for its round when the call has no deadline.
    pub max_pull_wait: Duration,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            max_message_bytes: 64 << 20,
            max_pull_wait: Duration::from_secs(300),
        }
    }
}

impl NodeConfig {
    /// Checks the settings against each other.
    pub fn validate(&self) -> Result<()> {
        if self.chunk_bytes < 4 {
            return Err(invalid!(
                "chunk_bytes must be at least 4, got {}",
                self.chunk_bytes
            ));
        }
        if self.max_message_bytes < 1 << 20 {
            return Err(invalid!(
                "max_message_bytes must be at least 1 MiB, got {}",
                self.max_message_bytes
            ));
        }
        // A pull sends at least one chunk per message.
        if self.chunk_bytes > self.max_message_bytes / 2 {
            return Err(invalid!(
                "chunk_bytes ({}) must be at most half of max_message_bytes ({})",
                self.chunk_bytes,
                self.max_message_bytes
            ));
        }
        Ok(())
    }
}

/// Every job of this process, by name.
#[derive(Debug, Default)]
pub struct Node {
    jobs: DashMap<String, Arc<Job>>,
    pub config: NodeConfig,
}

/// What Init did.
#[derive(Debug)]
pub struct Created {
    pub job: Arc<Job>,
    pub created: bool,
}

impl Node {
    /// A node without jobs.
    pub fn new(config: NodeConfig) -> Node {
        Node {
            jobs: DashMap::new(),
            config,
        }
    }

    /// The job named `name`.
    pub fn job(&self, name: &str) -> Result<Arc<Job>> {
        self.jobs
            .get(name)
            .map(|j| Arc::clone(j.value()))
            .ok_or_else(|| Error::NotFound(name.to_owned()))
    }

    /// Every job, sorted by name.
    pub fn jobs(&self) -> Vec<Arc<Job>> {
        let mut jobs: Vec<Arc<Job>> = self.jobs.iter().map(|j| Arc::clone(j.value())).collect();
        jobs.sort_by(|a, b| a.name.cmp(&b.name));
        jobs
    }

    /// The existing job `name` if its configuration is `config`, an error if
    /// it differs, `None` if there is no such job.
    pub fn existing(&self, name: &str, config: &JobConfig) -> Result<Option<Arc<Job>>> {
        validate_job_name(name)?;
        match self.jobs.get(name) {
            None => Ok(None),
            Some(j) => same_job(j.value(), config).map(|()| Some(Arc::clone(j.value()))),
        }
    }

    /// Creates job `name` with initial `values`, unless an equal job was
    /// created meanwhile.
    pub async fn create(
        &self,
        name: &str,
        config: JobConfig,
        values: Vec<Segment>,
    ) -> Result<Created> {
        validate_job_name(name)?;
        let job = Job::create(name.to_owned(), config, self.config.chunk_bytes, values).await?;
        match self.jobs.entry(name.to_owned()) {
            Entry::Vacant(v) => {
                let job = Arc::new(job);
                v.insert(Arc::clone(&job));
                tracing::info!(job = %name, params = job.config.params.len(), workers = job.config.workers, optimizer = job.config.optimizer_name(), "job created");
                Ok(Created { job, created: true })
            }
            Entry::Occupied(o) => {
                same_job(o.get(), &job.config)?;
                Ok(Created {
                    job: Arc::clone(o.get()),
                    created: false,
                })
            }
        }
    }

    /// Drops job `name`; its memory is freed once in-flight calls finish.
    pub fn delete(&self, name: &str) -> Result<()> {
        let (_, job) = self
            .jobs
            .remove(name)
            .ok_or_else(|| Error::NotFound(name.to_owned()))?;
        job.close();
        tracing::info!(job = %name, "job deleted");
        Ok(())
    }
}

fn same_job(job: &Job, config: &JobConfig) -> Result<()> {
    if job.config == *config {
        Ok(())
    } else {
        Err(Error::JobMismatch {
            job: job.name.clone(),
            detail: job.config.first_difference(config),
        })
    }
}
