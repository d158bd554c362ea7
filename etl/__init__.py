"""ETL: labelled images -> sharded TFRecords in one of three forms (Apache Beam)."""
