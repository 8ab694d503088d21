"""Generated protobuf and gRPC code for package rlhf_online.v1 (from protos/; regenerate with `make protos`)."""
