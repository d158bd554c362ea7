"""The contract between the ETL and the trainer: record schema, file layout, sidecar and preprocessing."""
