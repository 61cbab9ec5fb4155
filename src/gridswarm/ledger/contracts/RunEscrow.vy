# pragma version ~=0.4.3
"""
@title RunEscrow
@notice Escrow of one gridswarm run. The sponsor funds it; the hub posts, once per epoch, the
        Merkle root of every node's CUMULATIVE reward; a node (or anyone on its behalf) claims
        cumulative - already claimed. The hub may also anchor the embedded ledger's checkpoint roots.
        Solvency: allocated <= funded - refunded, and claims never exceed allocated.
@dev Leaves are keccak256(keccak256(abi_encode(account, cumulative))) and parents hash the sorted
     pair, as in OpenZeppelin's StandardMerkleTree / MerkleProof (gridswarm.ledger.merkle).
"""

interface IERC20:
    def transfer(_to: address, _value: uint256) -> bool: nonpayable
    def transferFrom(_from: address, _to: address, _value: uint256) -> bool: nonpayable

event Funded:
    funder: indexed(address)
    amount: uint256
    funded: uint256

event RootPosted:
    epoch: indexed(uint256)
    root: bytes32
    allocated: uint256

event Claimed:
    account: indexed(address)
    epoch: uint256
    amount: uint256
    cumulative: uint256

event Anchored:
    seq: indexed(uint256)
    root: bytes32

event Refunded:
    sponsor: indexed(address)
    amount: uint256

token: public(IERC20)
hub: public(address)
sponsor: public(address)
funded: public(uint256)
allocated: public(uint256)
claimed_total: public(uint256)
refunded: public(uint256)
epochs: public(uint256)
closed: public(bool)
roots: public(HashMap[uint256, bytes32])
claimed: public(HashMap[address, uint256])
anchors: public(HashMap[uint256, bytes32])
anchor_count: public(uint256)
anchor_seq: public(HashMap[uint256, uint256])


@deploy
def __init__(_token: address, _hub: address, _sponsor: address):
    self.token = IERC20(_token)
    self.hub = _hub
    self.sponsor = _sponsor


@external
def fund(_amount: uint256):
    assert not self.closed, "run closed"
    assert _amount > 0, "amount must be > 0"
    self.funded += _amount
    assert extcall self.token.transferFrom(msg.sender, self, _amount), "transferFrom failed"
    log Funded(funder=msg.sender, amount=_amount, funded=self.funded)


@external
def post_root(_epoch: uint256, _root: bytes32, _allocated: uint256):
    assert msg.sender == self.hub, "only hub"
    assert _epoch == self.epochs, "epochs are posted in order"
    assert _root != empty(bytes32), "empty root"
    assert _allocated >= self.allocated, "cumulative total cannot shrink"
    assert _allocated <= self.funded - self.refunded, "allocation exceeds funding"
    self.roots[_epoch] = _root
    self.allocated = _allocated
    self.epochs = _epoch + 1
    log RootPosted(epoch=_epoch, root=_root, allocated=_allocated)


@internal
@pure
def _leaf(_account: address, _cumulative: uint256) -> bytes32:
    return keccak256(keccak256(abi_encode(_account, _cumulative)))


@internal
@pure
def _verify(_proof: DynArray[bytes32, 32], _root: bytes32, _leaf: bytes32) -> bool:
    node: bytes32 = _leaf
    for sibling: bytes32 in _proof:
        if convert(node, uint256) <= convert(sibling, uint256):
            node = keccak256(concat(node, sibling))
        else:
            node = keccak256(concat(sibling, node))
    return node == _root


@view
@external
def verify_claim(
    _account: address, _epoch: uint256, _cumulative: uint256, _proof: DynArray[bytes32, 32]
) -> bool:
    root: bytes32 = self.roots[_epoch]
    return root != empty(bytes32) and self._verify(_proof, root, self._leaf(_account, _cumulative))


@external
def claim(
    _account: address, _epoch: uint256, _cumulative: uint256, _proof: DynArray[bytes32, 32]
) -> uint256:
    root: bytes32 = self.roots[_epoch]
    assert root != empty(bytes32), "no root for epoch"
    assert self._verify(_proof, root, self._leaf(_account, _cumulative)), "invalid proof"
    already: uint256 = self.claimed[_account]
    assert _cumulative > already, "nothing to claim"
    amount: uint256 = _cumulative - already
    self.claimed[_account] = _cumulative
    self.claimed_total += amount
    assert extcall self.token.transfer(_account, amount), "transfer failed"
    log Claimed(account=_account, epoch=_epoch, amount=amount, cumulative=_cumulative)
    return amount


@external
def anchor(_seq: uint256, _root: bytes32):
    assert msg.sender == self.hub, "only hub"
    assert _root != empty(bytes32), "empty root"
    assert self.anchors[_seq] == empty(bytes32), "already anchored"
    self.anchors[_seq] = _root
    self.anchor_seq[self.anchor_count] = _seq
    self.anchor_count += 1
    log Anchored(seq=_seq, root=_root)


@external
def close():
    assert msg.sender == self.hub or msg.sender == self.sponsor, "only hub or sponsor"
    self.closed = True


@external
def refund() -> uint256:
    assert msg.sender == self.sponsor, "only sponsor"
    assert self.closed, "run not closed"
    amount: uint256 = self.funded - self.refunded - self.allocated
    assert amount > 0, "nothing to refund"
    self.refunded += amount
    assert extcall self.token.transfer(self.sponsor, amount), "transfer failed"
    log Refunded(sponsor=self.sponsor, amount=amount)
    return amount
