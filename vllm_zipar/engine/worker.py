"""Worker subclasses (`worker_cls`) that install our model runners and attention in vLLM's own workers.

A worker class travels to every worker process by name, so this is how the runner change and the attention
choice reach workers under the `mp` and Ray executors alike. The attention backend is chosen here, once per
process and before the model is built, for every attention layer (`attention_backends.py`).
"""

from __future__ import annotations

import torch
from vllm.v1.worker.cpu_worker import CPUWorker
from vllm.v1.worker.gpu_worker import Worker as GPUWorker

from vllm_zipar.engine.attention_backends import install_zipar_attention
from vllm_zipar.engine.runner import ZipARCPUModelRunner, ZipARGPUModelRunner


class ZipARCPUWorker(CPUWorker):
    def init_device(self) -> None:
        install_zipar_attention(self.vllm_config)
        super().init_device()
        # CPUWorker.init_device builds the stock runner inline (vLLM 0.32); rebuild ours before any model
        # is loaded into it.
        self.model_runner = ZipARCPUModelRunner(self.vllm_config, torch.device("cpu"))


class ZipARGPUWorker(GPUWorker):
    def init_device(self) -> None:
        install_zipar_attention(self.vllm_config)
        super().init_device()

    def _make_model_runner(self) -> ZipARGPUModelRunner:
        return ZipARGPUModelRunner(self.vllm_config, self.device)
