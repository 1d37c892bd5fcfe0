"""Test axes, listed once and shared by the CPU and GPU suites."""
KERNEL_SIZES = [1, 2, 3, 5, (3, 1, 3)]
STRIDES = [1, 2]
DILATIONS = [1, 2]
BATCHES = [1, 3]
KINDS = ["submanifold", "strided", "transposed", "generative"]
DTYPES = ["float64", "float32", "float16", "bfloat16"]


def kind_args(kind: str, stride):
    """``(stride, transposed, generative)`` for a kind; submanifold ignores the stride axis."""
    if kind == "submanifold":
        return 1, False, False
    if kind == "strided":
        return stride, False, False
    if kind == "transposed":
        return stride, True, False
    return stride, True, True
