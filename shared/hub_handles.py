"""TF Hub modules the project names by default, defined once for the ETL and the trainer."""

# The public MobileNetV2 feature vector: float32 [N, 224, 224, 3] in [0, 1] -> [N, 1280]. It is the
# ETL's default --embedding_module and the mobilenet model's default --hub_handle. Without network,
# pass a local SavedModel path instead (etl.embeddings.save_random_mobilenet writes a stand-in).
MOBILENET_V2_FEATURE_VECTOR = "https://tfhub.dev/google/imagenet/mobilenet_v2_100_224/feature_vector/5"
