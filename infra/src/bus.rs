//! The event bus as Digame's processes open it: the seam and the embedded log
//! (`digame-bus`), Kafka (`digame-kafka`), and the choice between them that the
//! configuration makes.

use std::sync::Arc;
use std::time::Duration;

pub use digame_bus::*;
pub use digame_kafka as kafka;
pub use digame_kafka::{KafkaBus, KafkaSettings, TopicInfo};

/// Opens the bus `config` selects: the embedded log, or Kafka (creating missing topics).
pub async fn open(config: &crate::config::Config) -> Result<Arc<dyn EventBus>> {
    use crate::config::BusBackend;
    let bus = &config.bus;
    match config.bus_backend().map_err(BusError::Config)? {
        BusBackend::Embedded(dir) => Ok(Arc::new(LogBus::open(LogConfig {
            dir,
            partitions: bus.partitions,
            segment_bytes: bus.segment_bytes,
            retention_bytes: bus.retention_bytes,
            retention: Duration::from_secs(bus.retention_hours * 3600),
            queue_capacity: bus.queue_capacity,
            max_batch_bytes: 32 << 20,
        })?)),
        BusBackend::Kafka { brokers } => Ok(Arc::new(connect_kafka(config, brokers).await?)),
    }
}

/// Connects to the Kafka cluster of `config`, creating missing topics.
pub async fn connect_kafka(config: &crate::config::Config, brokers: String) -> Result<KafkaBus> {
    KafkaBus::connect(kafka_settings(config, brokers)).await
}

/// The Kafka settings of `config`.
pub fn kafka_settings(config: &crate::config::Config, brokers: String) -> KafkaSettings {
    let bus = &config.bus;
    KafkaSettings {
        brokers,
        prefix: bus.topic_prefix.clone(),
        partitions: bus.partitions,
        replication: bus.replication,
        delivery_timeout: Duration::from_millis(bus.delivery_timeout_ms),
        extra: bus.kafka.0.clone(),
    }
}
