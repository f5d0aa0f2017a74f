"""The key policy that lets CloudWatch Logs encrypt named log groups with a customer managed KMS key.

A log group with ``kms_key_id`` is only created if the key's own policy already lets the regional
CloudWatch Logs service use the key for that log group (the IAM policies of the caller do not count
for a service principal). The policy below is the one in the CloudWatch Logs user guide ("Encrypt
log data in CloudWatch Logs using AWS KMS"): the account keeps full control of the key (so IAM
policies such as the EKS cluster role's grant keep working), and ``logs.<region>.amazonaws.com``
may use it only under an encryption context naming one of the given log groups.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import pulumi
import pulumi_aws as aws


def logs_key_policy(partition: str, account: str, region: str, log_groups: Sequence[str]) -> str:
    """The key policy text for a key that encrypts ``log_groups`` (their names, not ARNs).

    Args:
        partition: ``aws`` (or ``aws-cn``, ``aws-us-gov``), from the caller identity's ARN.
        account: the account that owns the key and the log groups.
        region: the log groups' region.
        log_groups: log group names, e.g. ``/aws/eks/<cluster>/cluster``.
    """
    arns = [f"arn:{partition}:logs:{region}:{account}:log-group:{name}" for name in log_groups]
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Sid": "AccountAdministersTheKey",
                    "Effect": "Allow",
                    "Principal": {"AWS": f"arn:{partition}:iam::{account}:root"},
                    "Action": "kms:*",
                    "Resource": "*",
                },
                {
                    "Sid": "CloudWatchLogsEncryptsTheseGroups",
                    "Effect": "Allow",
                    "Principal": {"Service": f"logs.{region}.amazonaws.com"},
                    "Action": [
                        "kms:Encrypt*",
                        "kms:Decrypt*",
                        "kms:ReEncrypt*",
                        "kms:GenerateDataKey*",
                        "kms:Describe*",
                    ],
                    "Resource": "*",
                    "Condition": {"ArnLike": {"kms:EncryptionContext:aws:logs:arn": arns}},
                },
            ],
        }
    )


def logs_key(
    resource_name: str,
    *,
    description: str,
    region: str,
    log_groups: Sequence[str],
    tags: Mapping[str, str],
    parent: pulumi.Resource,
) -> aws.kms.Key:
    """A rotating KMS key whose policy lets CloudWatch Logs encrypt ``log_groups`` (and nothing else)."""
    identity = aws.get_caller_identity_output()
    return aws.kms.Key(
        resource_name,
        description=description,
        enable_key_rotation=True,
        deletion_window_in_days=30,
        policy=pulumi.Output.all(identity.arn, identity.account_id).apply(
            lambda v: logs_key_policy(partition_of(v[0]), v[1], region, log_groups)
        ),
        tags=dict(tags),
        opts=pulumi.ResourceOptions(parent=parent),
    )


def partition_of(arn: str) -> str:
    """The partition field of an ARN (``arn:aws:sts::…`` → ``aws``)."""
    return arn.split(":")[1]
