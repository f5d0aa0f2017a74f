"""The AWS provider: everything that names an AWS service, behind one folder.

What it owns: the VPC (``network.py``), the EKS cluster with its IAM roles, KMS key, node groups and
cluster add-ons (``gpu_cluster.py``), the EC2 GPU instance table that the pools and the stack config
read (``gpu_instances.py``), and the ECR repository and image push (``model_image.py``).

The seam: what the rest of the program needs from a provider is a Kubernetes ``k8s.Provider`` with
GPU nodes labelled ``dualdeploy.io/gpu-arch`` and ``dualdeploy.io/capacity-type`` and tainted
``nvidia.com/gpu`` (``GpuCluster.provider``), and an image reference by digest
(``ModelImage.image_ref``). The provider-neutral components (``components/model_service.py``,
``components/k8s_specs.py``) take those and nothing else. A GKE or AKS port would be a sibling
folder (``components/gcp/``, ``components/azure/``) with the same two outputs, plus its own
section in ``deploy/config.py``; nothing here is shared with such a port but those labels.

What it may import: ``pulumi``, ``pulumi_aws``, ``pulumi_kubernetes``, ``pulumi_docker``, and
``components/k8s_specs.py`` for the labels and GPU resource name. Never ``deploy/``, ``serving/``
or ``model_build/``.
"""
