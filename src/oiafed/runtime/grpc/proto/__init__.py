"""Generated gRPC/protobuf modules of the deployment wire (source: ``oiafed.proto``)."""
