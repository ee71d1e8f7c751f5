"""Protocol-buffer bindings for Caffe's schema (generated from protos/caffe.proto)."""
