"""The ``trt`` speed level: engines on disk (``cache``), built in a background process (``build``, ``background``)
and hung on the refiner's UNet (``unet``)."""
