"""cic-gpt2: GPT-2 fine-tuning for CICIoT2023 network-traffic classification on DeepSpeed."""
import logging
import warnings

__version__ = "0.1.0"

# Two known-harmless messages that DeepSpeed and torch repeat on every CPU run (several times per eval);
# exactly these are dropped, every other warning is kept.
# - DeepSpeed's accelerator auto-detection logs this on any machine without a GPU (our CPU path by design).
logging.getLogger("DeepSpeed").addFilter(
    lambda record: not record.getMessage().startswith("Setting accelerator to CPU."))
# - DeepSpeed's ZeRO-2 calls torch.distributed.all_gather_into_tensor, which torch now marks deprecated.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                        category=FutureWarning)
