"""Weight loading: safetensors directories, GGUF files (converted once, cached), the embedded
default model."""

# {HF tensor name: GGUF type name} of the source file, beside the weights: the engine serves
# quantized tensors in the scheme that carries the file's own quantization. Here, not in
# gguf.py, so that loading a safetensors model never imports the `gguf` package.
TENSOR_TYPES_FILE = "gguf_tensor_types.json"
