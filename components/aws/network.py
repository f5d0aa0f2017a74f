"""The VPC for the GPU cluster: private subnets for nodes, public subnets for load balancers.

Nodes never get public addresses. Each availability zone has one private subnet
(nodes, tagged for internal load balancers) and one public subnet (NAT gateway and
internet-facing load balancers). The subnet tags are the ones the AWS Load Balancer
Controller and the in-tree service controller look for.

VPC flow logs (accepted and rejected traffic of every interface) go to a CloudWatch log group
encrypted with the network's own KMS key, through a role that only the flow-logs service may
assume and that may only write to that group.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pulumi
import pulumi_aws as aws

from components.aws.log_encryption import logs_key

NAT_MODES = ("single", "per-az")
MAX_ZONES = 6
"""The subnet layout carves at most six zones out of the VPC block."""


@dataclass
class NetworkArgs:
    """Inputs of :class:`Network`."""

    cidr: str
    """IPv4 block of the VPC, /16 to /20. Concrete, because the subnets are carved from it here."""

    availability_zones: Sequence[str]
    """At least two zones. Concrete, because it decides how many subnets exist."""

    cluster_name: str
    """The EKS cluster that uses the subnets. Concrete: it is part of a tag *key*
    (``kubernetes.io/cluster/<name>``), and keys cannot wait for an Output."""

    region: str
    """AWS region (the flow-log key's policy names the regional CloudWatch Logs service)."""

    nat_gateways: str = "single"
    """``single`` (one NAT gateway, cheaper) or ``per-az`` (one a zone, zone-redundant)."""

    ingress_addresses: bool = False
    """Allocate one Elastic IP per zone for an internet-facing NLB (``ingress_allocation_ids``): its
    addresses are then known before it exists, and stay when it is replaced. The hybrid stack's edge
    sites name them in their egress firewall."""

    flow_log_retention_days: int = 90
    """Retention of the VPC flow-log group."""

    tags: Mapping[str, str] = field(default_factory=dict)
    """Tags for every resource."""


def subnet_cidrs(cidr: str, zones: int) -> tuple[list[str], list[str]]:
    """Carve private and public subnet blocks out of the VPC block.

    The VPC splits into eight equal blocks: the first ``zones`` are the private subnets
    (large: nodes and pods take VPC addresses with the AWS CNI); the last block splits
    again into eight small public subnets.

    Raises:
        ValueError: more than six zones, or a block too small to split.
    """
    net = ipaddress.IPv4Network(cidr)
    if zones > MAX_ZONES:
        raise ValueError(f"availability_zones: at most {MAX_ZONES} zones fit this layout, got {zones}")
    if net.prefixlen > 20:
        raise ValueError(f"cidr: {cidr} is too small; use /16 to /20")
    eighths = list(net.subnets(prefixlen_diff=3))
    private = [str(block) for block in eighths[:zones]]
    public = [str(block) for block in list(eighths[7].subnets(prefixlen_diff=3))[:zones]]
    return private, public


class Network(pulumi.ComponentResource):
    """A VPC over two or more availability zones, ready for EKS."""

    vpc_id: pulumi.Output[str]
    private_subnet_ids: pulumi.Output[list[str]]
    public_subnet_ids: pulumi.Output[list[str]]
    ingress_allocation_ids: pulumi.Output[list[str]]
    """The NLB's Elastic IP allocations, one per zone (empty without ``ingress_addresses``)."""
    ingress_public_ips: pulumi.Output[list[str]]
    """Their public addresses, in the same order."""

    def __init__(self, name: str, args: NetworkArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        """Create the VPC, subnets, gateways and route tables.

        Raises:
            ValueError: fewer than two zones, an unknown NAT mode or a bad CIDR.
        """
        if len(args.availability_zones) < 2 or len(set(args.availability_zones)) != len(
            args.availability_zones
        ):
            raise ValueError(
                "availability_zones: EKS needs at least 2 distinct zones, "
                f"got {list(args.availability_zones)}"
            )
        if args.flow_log_retention_days < 1:
            raise ValueError(f"flow_log_retention_days: must be ≥ 1, got {args.flow_log_retention_days}")
        if args.nat_gateways not in NAT_MODES:
            raise ValueError(f"nat_gateways: {args.nat_gateways!r} is not one of {', '.join(NAT_MODES)}")
        private_cidrs, public_cidrs = subnet_cidrs(args.cidr, len(args.availability_zones))
        super().__init__("dualdeploy:network:Network", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        tags = dict(args.tags)

        def named(suffix: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
            return {**tags, "Name": f"{name}-{suffix}", **(extra or {})}

        cluster_tag = f"kubernetes.io/cluster/{args.cluster_name}"

        vpc = aws.ec2.Vpc(
            f"{name}-vpc",
            cidr_block=args.cidr,
            enable_dns_hostnames=True,
            enable_dns_support=True,
            tags=named("vpc"),
            opts=child,
        )
        # The default security group of a VPC allows all traffic between its members; take
        # every rule away so nothing relies on it by accident (CIS AWS 5.4).
        aws.ec2.DefaultSecurityGroup(
            f"{name}-default-sg", vpc_id=vpc.id, tags=named("default-sg"), opts=child
        )
        igw = aws.ec2.InternetGateway(f"{name}-igw", vpc_id=vpc.id, tags=named("igw"), opts=child)

        public_subnets: list[aws.ec2.Subnet] = []
        private_subnets: list[aws.ec2.Subnet] = []
        for zone, private_cidr, public_cidr in zip(
            args.availability_zones, private_cidrs, public_cidrs, strict=True
        ):
            suffix = zone[-1]
            public_subnets.append(
                aws.ec2.Subnet(
                    f"{name}-public-{suffix}",
                    vpc_id=vpc.id,
                    cidr_block=public_cidr,
                    availability_zone=zone,
                    map_public_ip_on_launch=False,
                    tags=named(f"public-{suffix}", {cluster_tag: "shared", "kubernetes.io/role/elb": "1"}),
                    opts=child,
                )
            )
            private_subnets.append(
                aws.ec2.Subnet(
                    f"{name}-private-{suffix}",
                    vpc_id=vpc.id,
                    cidr_block=private_cidr,
                    availability_zone=zone,
                    tags=named(
                        f"private-{suffix}", {cluster_tag: "shared", "kubernetes.io/role/internal-elb": "1"}
                    ),
                    opts=child,
                )
            )

        public_rt = aws.ec2.RouteTable(
            f"{name}-public-rt",
            vpc_id=vpc.id,
            routes=[aws.ec2.RouteTableRouteArgs(cidr_block="0.0.0.0/0", gateway_id=igw.id)],
            tags=named("public-rt"),
            opts=child,
        )
        for subnet, zone in zip(public_subnets, args.availability_zones, strict=True):
            aws.ec2.RouteTableAssociation(
                f"{name}-public-rta-{zone[-1]}", subnet_id=subnet.id, route_table_id=public_rt.id, opts=child
            )

        nat_count = 1 if args.nat_gateways == "single" else len(args.availability_zones)
        nats: list[aws.ec2.NatGateway] = []
        for index in range(nat_count):
            suffix = args.availability_zones[index][-1]
            eip = aws.ec2.Eip(
                f"{name}-nat-eip-{suffix}", domain="vpc", tags=named(f"nat-eip-{suffix}"), opts=child
            )
            nats.append(
                aws.ec2.NatGateway(
                    f"{name}-nat-{suffix}",
                    allocation_id=eip.id,
                    subnet_id=public_subnets[index].id,
                    tags=named(f"nat-{suffix}"),
                    opts=pulumi.ResourceOptions(parent=self, depends_on=[igw]),
                )
            )
        for index, (subnet, zone) in enumerate(zip(private_subnets, args.availability_zones, strict=True)):
            nat = nats[index if nat_count > 1 else 0]
            private_rt = aws.ec2.RouteTable(
                f"{name}-private-rt-{zone[-1]}",
                vpc_id=vpc.id,
                routes=[aws.ec2.RouteTableRouteArgs(cidr_block="0.0.0.0/0", nat_gateway_id=nat.id)],
                tags=named(f"private-rt-{zone[-1]}"),
                opts=child,
            )
            aws.ec2.RouteTableAssociation(
                f"{name}-private-rta-{zone[-1]}",
                subnet_id=subnet.id,
                route_table_id=private_rt.id,
                opts=child,
            )

        self._flow_logs(name, args, vpc, named)

        ingress = [
            aws.ec2.Eip(
                f"{name}-ingress-eip-{zone[-1]}",
                domain="vpc",
                tags=named(f"ingress-eip-{zone[-1]}"),
                opts=pulumi.ResourceOptions(parent=self, depends_on=[igw]),
            )
            for zone in (args.availability_zones if args.ingress_addresses else ())
        ]
        self.ingress_allocation_ids = pulumi.Output.all(*[eip.allocation_id for eip in ingress])
        self.ingress_public_ips = pulumi.Output.all(*[eip.public_ip for eip in ingress])

        self.vpc_id = vpc.id
        self.private_subnet_ids = pulumi.Output.all(*[s.id for s in private_subnets])
        self.public_subnet_ids = pulumi.Output.all(*[s.id for s in public_subnets])
        self.register_outputs(
            {
                "vpc_id": self.vpc_id,
                "private_subnet_ids": self.private_subnet_ids,
                "public_subnet_ids": self.public_subnet_ids,
                "ingress_allocation_ids": self.ingress_allocation_ids,
                "ingress_public_ips": self.ingress_public_ips,
            }
        )

    def _flow_logs(self, name: str, args: NetworkArgs, vpc: aws.ec2.Vpc, named: Any) -> None:
        """Flow logs of the whole VPC (accepted and rejected) into a KMS-encrypted log group."""
        child = pulumi.ResourceOptions(parent=self)
        group_name = f"/dualdeploy/vpc-flow-logs/{args.cluster_name}"
        key = logs_key(
            f"{name}-flow-logs-key",
            description=f"Encryption of the VPC flow logs of {args.cluster_name}",
            region=args.region,
            log_groups=[group_name],
            tags=named("flow-logs-key"),
            parent=self,
        )
        group = aws.cloudwatch.LogGroup(
            f"{name}-flow-logs",
            name=group_name,
            retention_in_days=args.flow_log_retention_days,
            kms_key_id=key.arn,
            tags=named("flow-logs"),
            opts=child,
        )
        role = aws.iam.Role(
            f"{name}-flow-logs-role",
            assume_role_policy=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [
                        {
                            "Effect": "Allow",
                            "Principal": {"Service": "vpc-flow-logs.amazonaws.com"},
                            "Action": "sts:AssumeRole",
                        }
                    ],
                }
            ),
            tags=named("flow-logs-role"),
            opts=child,
        )
        write = aws.iam.RolePolicy(
            f"{name}-flow-logs-write",
            role=role.id,
            policy=group.arn.apply(flow_log_write_policy),
            opts=child,
        )
        aws.ec2.FlowLog(
            f"{name}-flow-log",
            vpc_id=vpc.id,
            traffic_type="ALL",
            log_destination_type="cloud-watch-logs",
            log_destination=group.arn,
            iam_role_arn=role.arn,
            max_aggregation_interval=600,
            tags=named("flow-log"),
            opts=pulumi.ResourceOptions(parent=self, depends_on=[write]),
        )


def flow_log_write_policy(group_arn: str) -> str:
    """What the flow-logs service may do with its role: write streams of this one log group."""
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Action": [
                        "logs:CreateLogStream",
                        "logs:PutLogEvents",
                        "logs:DescribeLogGroups",
                        "logs:DescribeLogStreams",
                    ],
                    "Resource": [group_arn, f"{group_arn}:*"],
                }
            ],
        }
    )
