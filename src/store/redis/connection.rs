//! One connection type over a single Redis server and a Redis Cluster, so
//! the store's commands are written once. Both kinds reconnect on their
//! own after Redis comes back.

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

/// A shared, multiplexed connection to Redis; cheap to clone.
#[derive(Clone)]
pub enum Connection {
    Single(ConnectionManager),
    // Boxed: the cluster client is much larger than the manager, and
    // every command clones the connection.
    Cluster(Box<LazyCluster>),
}

/// A cluster connection made on first use, so sendguard starts while the
/// cluster is down.
#[derive(Clone)]
pub struct LazyCluster {
    client: ClusterClient,
    connection: Arc<Mutex<Option<ClusterConnection>>>,
}

impl LazyCluster {
    async fn get(&self) -> RedisResult<ClusterConnection> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref() {
            return Ok(connection.clone());
        }
        let connection = self.client.get_async_connection().await?;
        *slot = Some(connection.clone());
        Ok(connection)
    }
}

impl Connection {
    /// Creates the connection without connecting: the first command
    /// connects.
    ///
    /// # Errors
    /// When a URL is invalid.
    pub fn new(url: Option<&str>, nodes: &[String], timeout: Duration) -> RedisResult<Connection> {
        if let Some(url) = url {
            let client = redis::Client::open(url)?;
            // Few, quick reconnection attempts: a command fails within a
            // few timeouts while Redis is down instead of queueing.
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(500));
            let manager = ConnectionManager::new_lazy_with_config(client, config)?;
            return Ok(Connection::Single(manager));
        }
        let client = ClusterClient::builder(nodes.to_vec())
            .connection_timeout(timeout)
            .response_timeout(timeout)
            .retries(2)
            .build()?;
        Ok(Connection::Cluster(Box::new(LazyCluster {
            client,
            connection: Arc::new(Mutex::new(None)),
        })))
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(manager) => manager.req_packed_command(cmd),
            Connection::Cluster(lazy) => Box::pin(async move {
                let mut connection = lazy.get().await?;
                connection.req_packed_command(cmd).await
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(manager) => manager.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(lazy) => Box::pin(async move {
                let mut connection = lazy.get().await?;
                connection
                    .req_packed_commands(pipeline, offset, count)
                    .await
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(manager) => manager.get_db(),
            Connection::Cluster(_) => 0,
        }
    }
}
