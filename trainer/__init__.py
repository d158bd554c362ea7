"""Trainer: tf.data ingest of the ETL's records, tf_keras models, tf.distribute, export."""
