from serving_optimiser.runtime import quiet_tensorflow

# No TensorFlow start-up lines in the test output, on any CPU: before any test imports it.
quiet_tensorflow()
