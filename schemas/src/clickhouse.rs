//! ClickHouse table definitions derived from the record types.
//!
//! Every column comes from the record's [`Layout`] (itself derived from the serde type), so
//! the ClickHouse schema cannot drift from the Parquet one: adding a field to a record adds
//! the column here, and the migration checksums then demand a migration for it.
//!
//! The DDL works on ClickHouse 18.16 (Debian's package) and on current releases, which
//! dictates three mappings:
//! - A timestamp becomes `name DateTime('UTC')` (seconds) plus `name_ms UInt16`
//!   (the milliseconds within that second): `DateTime64` does not exist on 18.16.
//! - Booleans are `UInt8`; free-form JSON objects are `String` holding the JSON text.
//! - Columns of the sorting key are never `Nullable` (18.16 refuses that); a missing value
//!   is stored as the type's default.
//!
//! A replacing table's version column is unsigned (`UInt64`), as 18.16 requires.

use arrow_schema::DataType;

use crate::arrow::{Column, Layout};
use crate::{ActivityEvent, AnomalyRow, DeadLetter, FeatureRow, PredictionRow};

/// The tables of the store, as ClickHouse holds them.
pub fn tables() -> Vec<TableSpec> {
    vec![
        TableSpec {
            name: "events",
            layout: Layout::of::<ActivityEvent>(),
            // Replays insert the same event again (same id and time): merges and `FINAL`
            // reads keep one.
            engine: Engine::Replacing { version: None },
            partition_time: "timestamp",
            order_by: vec![
                "tenant_id",
                "user_id",
                "timestamp",
                "timestamp_ms",
                "event_id",
            ],
        },
        TableSpec {
            name: "features",
            layout: Layout::of::<FeatureRow>(),
            engine: Engine::Replacing {
                version: Some(FeatureRow::VERSION),
            },
            partition_time: "window_start",
            order_by: FeatureRow::KEY.to_vec(),
        },
        TableSpec {
            name: "anomalies",
            layout: Layout::of::<AnomalyRow>(),
            engine: Engine::Replacing {
                version: Some("revision"),
            },
            partition_time: "window_start",
            order_by: vec![
                "tenant_id",
                "user_id",
                "detector",
                "feature",
                "window_start",
            ],
        },
        TableSpec {
            name: "predictions",
            layout: Layout::of::<PredictionRow>(),
            engine: Engine::Replacing {
                version: Some("revision"),
            },
            partition_time: "horizon_start",
            order_by: vec!["tenant_id", "user_id", "model", "target", "horizon_start"],
        },
        TableSpec {
            name: "dead_letters",
            layout: Layout::of::<DeadLetter>(),
            engine: Engine::MergeTree,
            partition_time: "rejected_at",
            order_by: vec!["tenant_id", "rejected_at"],
        },
    ]
}

/// Columns added to a table after the migration that created it: (table, column, the
/// migration that adds it). Earlier migrations are derived without them, so their text and
/// checksums never change when a record gains a field.
pub const ADDED_COLUMNS: &[(&str, &str, u32)] = &[
    ("features", "params_version", 4),
    ("features", "final_revision", 5),
];

/// The table engine family of a table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Engine {
    /// Append-only.
    MergeTree,
    /// One row per sorting key after merges (and in `FINAL` reads): the highest `version`,
    /// or the last inserted when there is none.
    Replacing { version: Option<&'static str> },
}

/// How a record type is stored in ClickHouse.
#[derive(Clone, Debug)]
pub struct TableSpec {
    pub name: &'static str,
    pub layout: Layout,
    pub engine: Engine,
    /// The timestamp column whose month partitions the table.
    pub partition_time: &'static str,
    /// The sorting key (also the replacing key).
    pub order_by: Vec<&'static str>,
}

/// One physical ClickHouse column.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChColumn {
    pub name: String,
    /// The type as `system.columns` spells it.
    pub ch_type: String,
}

impl TableSpec {
    /// The table as it stood after migration `version`: columns added later are left out.
    pub fn as_of(&self, version: u32) -> TableSpec {
        let mut spec = self.clone();
        spec.layout.columns.retain(|c| {
            !ADDED_COLUMNS
                .iter()
                .any(|(t, col, v)| *t == self.name && *col == c.name && *v > version)
        });
        spec
    }

    /// `ALTER TABLE … ADD COLUMN` for a column of [`ADDED_COLUMNS`], placed where the
    /// layout has it (for a cluster: the local and the distributed table).
    pub fn add_column_sql(
        &self,
        database: &str,
        column: &str,
        cluster: Option<&ClusterSpec>,
    ) -> Vec<String> {
        let columns = self.columns();
        let Some(i) = columns.iter().position(|c| c.name == column) else {
            return Vec::new();
        };
        let after = i
            .checked_sub(1)
            .map(|j| format!(" AFTER `{}`", columns[j].name))
            .unwrap_or_default();
        let alter = |table: &str, on_cluster: &str| {
            format!(
                "ALTER TABLE `{database}`.`{table}`{on_cluster} ADD COLUMN `{column}` {}{after}",
                columns[i].ch_type
            )
        };
        match cluster {
            None => vec![alter(self.name, "")],
            Some(c) => {
                let on = format!(" ON CLUSTER `{}`", c.name);
                vec![
                    alter(&format!("{}_local", self.name), &on),
                    alter(self.name, &on),
                ]
            }
        }
    }

    /// The physical columns, in order.
    pub fn columns(&self) -> Vec<ChColumn> {
        let mut out = Vec::new();
        for c in &self.layout.columns {
            let in_key = self.order_by.contains(&c.name.as_str());
            let is_version =
                matches!(self.engine, Engine::Replacing { version: Some(v) } if v == c.name);
            let nullable = c.nullable && !in_key && !is_version;
            let wrap = |t: &str| {
                if nullable {
                    format!("Nullable({t})")
                } else {
                    t.to_string()
                }
            };
            if matches!(c.data_type, DataType::Timestamp(..)) {
                out.push(ChColumn {
                    name: c.name.clone(),
                    ch_type: wrap("DateTime('UTC')"),
                });
                out.push(ChColumn {
                    name: format!("{}_ms", c.name),
                    ch_type: wrap("UInt16"),
                });
                continue;
            }
            let base = if is_version {
                "UInt64".to_string()
            } else {
                scalar(c)
            };
            let ch_type = match &c.data_type {
                // Array elements are never Nullable; the array itself may be empty.
                DataType::List(_) => base,
                _ => wrap(&base),
            };
            out.push(ChColumn {
                name: c.name.clone(),
                ch_type,
            });
        }
        out
    }

    /// `CREATE TABLE IF NOT EXISTS` for a single server, or for the replicated local table
    /// of a cluster when `cluster` is given.
    pub fn create_sql(&self, database: &str, cluster: Option<&ClusterSpec>) -> String {
        let columns = self
            .columns()
            .iter()
            .map(|c| format!("    `{}` {}", c.name, c.ch_type))
            .collect::<Vec<_>>()
            .join(",\n");
        let (table, on_cluster, engine) = match cluster {
            None => (self.name.to_string(), String::new(), self.engine_sql(None)),
            Some(c) => (
                format!("{}_local", self.name),
                format!(" ON CLUSTER `{}`", c.name),
                self.engine_sql(Some(&format!(
                    "'/clickhouse/tables/{{shard}}/{database}/{}_local', '{{replica}}'",
                    self.name
                ))),
            ),
        };
        format!(
            "CREATE TABLE IF NOT EXISTS `{database}`.`{table}`{on_cluster} (\n{columns}\n) ENGINE = {engine}\nPARTITION BY toYYYYMM(`{}`)\nORDER BY ({})",
            self.partition_time,
            self.order_by
                .iter()
                .map(|c| format!("`{c}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }

    /// The `Distributed` table over the local tables of a cluster, sharded by person so one
    /// person's rows stay on one shard.
    pub fn distributed_sql(&self, database: &str, cluster: &ClusterSpec) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS `{database}`.`{name}` ON CLUSTER `{c}` AS `{database}`.`{name}_local` ENGINE = Distributed(`{c}`, `{database}`, `{name}_local`, cityHash64(`tenant_id`, `user_id`))",
            name = self.name,
            c = cluster.name,
        )
    }

    fn engine_sql(&self, replication: Option<&str>) -> String {
        let prefix = if replication.is_some() {
            "Replicated"
        } else {
            ""
        };
        let mut args: Vec<String> = replication.map(str::to_string).into_iter().collect();
        let family = match &self.engine {
            Engine::MergeTree => "MergeTree",
            Engine::Replacing { version } => {
                args.extend(version.map(|v| format!("`{v}`")));
                "ReplacingMergeTree"
            }
        };
        format!("{prefix}{family}({})", args.join(", "))
    }
}

/// Cluster mode: replicated local tables on every node and distributed tables over them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterSpec {
    /// The cluster's name in the servers' `remote_servers` configuration.
    pub name: String,
}

fn scalar(c: &Column) -> String {
    if c.json_text {
        return "String".into();
    }
    match &c.data_type {
        DataType::Utf8 => "String".into(),
        DataType::Boolean | DataType::UInt8 => "UInt8".into(),
        DataType::UInt16 => "UInt16".into(),
        DataType::UInt32 => "UInt32".into(),
        DataType::UInt64 => "UInt64".into(),
        DataType::Int32 => "Int32".into(),
        DataType::Int64 => "Int64".into(),
        DataType::Float64 => "Float64".into(),
        DataType::List(item) => {
            let inner = Column {
                data_type: item.data_type().clone(),
                ..c.clone()
            };
            format!("Array({})", scalar(&inner))
        }
        other => panic!("no ClickHouse mapping for {other} (column {})", c.name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features() -> TableSpec {
        let mut spec = tables().into_iter().find(|t| t.name == "features").unwrap();
        // A shorter key keeps the expected DDL below readable.
        spec.order_by = vec!["tenant_id", "user_id", "window_start"];
        spec
    }

    #[test]
    fn every_key_column_exists() {
        for t in tables() {
            let cols = t.columns();
            for k in &t.order_by {
                let c = cols
                    .iter()
                    .find(|c| c.name == *k)
                    .unwrap_or_else(|| panic!("{}: key column {k} is not a column", t.name));
                assert!(!c.ch_type.starts_with("Nullable"), "{}.{k}", t.name);
            }
            assert!(cols.iter().any(|c| c.name == t.partition_time));
        }
    }

    #[test]
    fn timestamps_split_and_keys_are_not_nullable() {
        let cols = features().columns();
        let find = |n: &str| cols.iter().find(|c| c.name == n).unwrap().ch_type.clone();
        assert_eq!(find("window_start"), "DateTime('UTC')");
        assert_eq!(find("window_start_ms"), "UInt16");
        assert_eq!(find("revision"), "UInt64");
        assert_eq!(find("is_final"), "UInt8");
        assert_eq!(find("value"), "Float64");
        assert_eq!(find("granularity"), "String");
        assert_eq!(find("params_version"), "UInt64");
        assert_eq!(find("final_revision"), "Int64");
        // FeatureRow has 14 fields, two of them timestamps.
        assert_eq!(cols.len(), 16);
    }

    #[test]
    fn added_columns_are_left_out_of_earlier_versions_and_added_in_place() {
        let spec = features();
        let v1 = spec.as_of(1);
        assert!(v1.columns().iter().all(|c| c.name != "params_version"));
        assert_eq!(v1.columns().len() + 2, spec.columns().len());
        assert_eq!(spec.as_of(4).columns().len() + 1, spec.columns().len());
        assert_eq!(spec.as_of(5).columns(), spec.columns());
        // Only the spec that has the column can place it.
        assert!(
            spec.as_of(3)
                .add_column_sql("d", "params_version", None)
                .is_empty()
        );
        assert_eq!(
            spec.add_column_sql("d", "params_version", None),
            vec![
                "ALTER TABLE `d`.`features` ADD COLUMN `params_version` UInt64 AFTER `feature_version`"
            ]
        );
        let c = ClusterSpec { name: "c".into() };
        let clustered = spec.add_column_sql("d", "params_version", Some(&c));
        assert_eq!(clustered.len(), 2);
        assert!(clustered[0].starts_with("ALTER TABLE `d`.`features_local` ON CLUSTER `c`"));
    }

    #[test]
    fn single_server_and_cluster_ddl() {
        let spec = features();
        let single = spec.create_sql("d", None);
        assert!(single.starts_with("CREATE TABLE IF NOT EXISTS `d`.`features` ("));
        assert!(single.contains(") ENGINE = ReplacingMergeTree(`revision`)\n"));
        assert!(single.ends_with(
            "PARTITION BY toYYYYMM(`window_start`)\nORDER BY (`tenant_id`, `user_id`, `window_start`)"
        ));
        let cluster = ClusterSpec { name: "c1".into() };
        let local = spec.create_sql("d", Some(&cluster));
        assert!(local.contains("`d`.`features_local` ON CLUSTER `c1`"));
        assert!(local.contains(
            "ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/d/features_local', '{replica}', `revision`)"
        ));
        assert_eq!(
            spec.distributed_sql("d", &cluster),
            "CREATE TABLE IF NOT EXISTS `d`.`features` ON CLUSTER `c1` AS `d`.`features_local` ENGINE = Distributed(`c1`, `d`, `features_local`, cityHash64(`tenant_id`, `user_id`))"
        );
    }
}
