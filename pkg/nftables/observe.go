package nftables

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"reflect"

	gnft "github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/nfgen"
	rs "github.com/miniproxy/miniproxy/pkg/nftables/ruleset"
)

// observed is what the kernel really holds in one of our tables, read only on
// full syncs whose generation check could not rule drift out.
type observed struct {
	exists bool
	// chains: names of the chains present.
	chains map[string]bool
	// drift: chains present whose rules differ from the desired ones in
	// anything (an expression, a value, the order, a rule too many or
	// too few).
	drift map[string]bool
	// rebuild is why only replacing the table repairs it ("" if not): a
	// base chain's hook, priority, type or policy, or a set's key, data
	// type or flags differ, which nf_tables does not let us change in place.
	rebuild string
	sets    map[string]bool
	// elems: map name → element key bytes → verdict ("goto chain").
	elems map[string]map[string]string
}

// observe reads table desired.Name of family f back from the kernel and
// compares it with all (desired, expanded): every chain's hook and rules,
// every set's shape, every element of the sets that are not dynamic. cl
// caches the chain listing across the tables of one sync.
func (b *Backend) observe(f model.Family, desired, all *rs.Table, cl chainLists) (*observed, error) {
	c, err := b.conn()
	if err != nil {
		return nil, err
	}
	obs := &observed{chains: map[string]bool{}, drift: map[string]bool{}, sets: map[string]bool{},
		elems: map[string]map[string]string{}}
	tables, err := c.ListTablesOfFamily(tableFamily(f))
	if err != nil {
		return nil, fmt.Errorf("listing tables: %w", err)
	}
	var t *gnft.Table
	for _, x := range tables {
		if x.Name == desired.Name {
			t = x
		}
	}
	if t == nil {
		return obs, nil
	}
	obs.exists = true
	d, err := newDumper(b.netns)
	if err != nil {
		return nil, err
	}
	defer d.Close()
	if err := compareChains(d, f, t, all, cl, obs); err != nil {
		return nil, err
	}
	if err := compareRules(d, f, desired.Name, all, obs); err != nil {
		return nil, err
	}
	if err := compareSets(d, f, t, all, obs); err != nil {
		return nil, err
	}
	for _, s := range all.AllSets() {
		if !obs.sets[s.Name] || s.Timeout > 0 {
			continue // missing (the plan adds it), or dynamic state that is not ours to compare
		}
		m, err := readElements(d, f, t.Name, s.Name)
		if err != nil {
			return nil, fmt.Errorf("listing elements of %s: %w", s.Name, err)
		}
		obs.elems[s.Name] = m
	}
	return obs, nil
}

// chainLists holds, per family, the chains of every table as the kernel
// listed them. A chain dump cannot be limited to one table (the kernel
// ignores the table in the request), so one full sync lists each family's
// chains once for all of its tables instead of once per table.
type chainLists map[model.Family]map[string][]*gnft.Chain

func (cl chainLists) of(d *dumper, f model.Family) (map[string][]*gnft.Chain, error) {
	if m, ok := cl[f]; ok {
		return m, nil
	}
	m := map[string][]*gnft.Chain{}
	err := d.dump(unix.NFT_MSG_GETCHAIN, byte(tableFamily(f)), nil, func(msg []byte) error {
		tv, _ := findAttr(msg, unix.NFTA_CHAIN_TABLE)
		table := string(bytes.TrimRight(tv, "\x00"))
		m[table] = append(m[table], kernelChain(msg))
		return nil
	})
	if err != nil {
		// An interrupted listing may lack chains: the plan would add
		// them again and fail; better to try again next time.
		return nil, fmt.Errorf("listing chains: %w", err)
	}
	cl[f] = m
	return m, nil
}

// compareChains takes the chains of table t from the family's listing and
// checks the hook, priority, type and policy of the desired ones.
func compareChains(d *dumper, f model.Family, t *gnft.Table, all *rs.Table, cl chainLists, obs *observed) error {
	lists, err := cl.of(d, f)
	if err != nil {
		return err
	}
	want := map[string]*rs.Chain{}
	for _, ch := range all.AllChains() {
		want[ch.Name] = ch
	}
	for _, k := range lists[t.Name] {
		obs.chains[k.Name] = true
		if w := want[k.Name]; w != nil && obs.rebuild == "" && !sameHook(chainSpec(t, w), k) {
			obs.rebuild = "chain " + k.Name + " has another hook, priority, type or policy"
		}
	}
	return nil
}

// kernelChain decodes the name, hook, priority, type and policy of a chain
// dump message.
func kernelChain(msg []byte) *gnft.Chain {
	k := &gnft.Chain{}
	for b := msg; ; {
		a, rest, ok := nextAttr(b)
		if !ok {
			return k
		}
		b = rest
		switch a.typ {
		case unix.NFTA_CHAIN_NAME:
			k.Name = string(bytes.TrimRight(a.val, "\x00"))
		case unix.NFTA_CHAIN_TYPE:
			k.Type = gnft.ChainType(bytes.TrimRight(a.val, "\x00"))
		case unix.NFTA_CHAIN_POLICY:
			if len(a.val) == 4 {
				p := gnft.ChainPolicy(binary.BigEndian.Uint32(a.val))
				k.Policy = &p
			}
		case unix.NFTA_CHAIN_HOOK:
			if v, ok := findAttr(a.val, unix.NFTA_HOOK_HOOKNUM); ok && len(v) == 4 {
				h := gnft.ChainHook(binary.BigEndian.Uint32(v))
				k.Hooknum = &h
			}
			if v, ok := findAttr(a.val, unix.NFTA_HOOK_PRIORITY); ok && len(v) == 4 {
				p := gnft.ChainPriority(int32(binary.BigEndian.Uint32(v)))
				k.Priority = &p
			}
		}
	}
}

// readElements returns the elements of set name: key bytes → verdict as
// verdictString writes it ("" for a set without data).
func readElements(d *dumper, f model.Family, table, name string) (map[string]string, error) {
	m := map[string]string{}
	req := appendStrAttr(appendStrAttr(nil, unix.NFTA_SET_ELEM_LIST_TABLE, table), unix.NFTA_SET_ELEM_LIST_SET, name)
	err := d.dump(unix.NFT_MSG_GETSETELEM, byte(tableFamily(f)), req, func(msg []byte) error {
		list, _ := findAttr(msg, unix.NFTA_SET_ELEM_LIST_ELEMENTS)
		for b := list; ; {
			el, rest, ok := nextAttr(b)
			if !ok {
				return nil
			}
			b = rest
			kd, _ := findAttr(el.val, unix.NFTA_SET_ELEM_KEY)
			key, _ := findAttr(kd, unix.NFTA_DATA_VALUE)
			v := ""
			if dd, ok := findAttr(el.val, unix.NFTA_SET_ELEM_DATA); ok {
				v = verdictOf(dd)
			}
			m[string(key)] = v
		}
	})
	if errors.Is(err, errDumpInterrupted) {
		// A half-read set compares as drifted where it differs; the
		// repair is then an element deleted and added again.
		err = nil
	}
	return m, err
}

// verdictOf decodes an NFTA_DATA holding a verdict.
func verdictOf(data []byte) string {
	vd, ok := findAttr(data, unix.NFTA_DATA_VERDICT)
	if !ok {
		return "data " + string(data) // not a verdict: never equal to one
	}
	var code int32
	chain := ""
	if v, ok := findAttr(vd, unix.NFTA_VERDICT_CODE); ok && len(v) == 4 {
		code = int32(binary.BigEndian.Uint32(v))
	}
	if v, ok := findAttr(vd, unix.NFTA_VERDICT_CHAIN); ok {
		chain = string(bytes.TrimRight(v, "\x00"))
	}
	return verdictString(expr.VerdictKind(code), chain)
}

// sameHook reports whether the kernel's chain k has the hook, priority, type
// and policy of spec (a regular chain has none of them).
func sameHook(spec, k *gnft.Chain) bool {
	if (spec.Hooknum == nil) != (k.Hooknum == nil) {
		return false
	}
	if spec.Hooknum == nil {
		return true
	}
	return *spec.Hooknum == *k.Hooknum && k.Priority != nil && *spec.Priority == *k.Priority &&
		spec.Type == k.Type && k.Policy != nil && *spec.Policy == *k.Policy
}

// compareRules dumps the rules of every desired chain present in the kernel,
// one chain per dump, and marks the chains whose rules differ in their
// canonical form. Chains the kernel has and desired has not are deleted by
// the plan without being read.
func compareRules(d *dumper, f model.Family, table string, all *rs.Table, obs *observed) error {
	enc := newRuleEncoder(f, table)
	var want, have, req []byte
	for _, ch := range all.AllChains() {
		if !obs.chains[ch.Name] {
			continue
		}
		want = want[:0]
		for _, r := range ch.Rules {
			ex, err := enc.exprs(r)
			if err != nil {
				return fmt.Errorf("encoding a rule of %s: %w", ch.Name, err)
			}
			want = canonRule(want, ex)
		}
		have = have[:0]
		req = appendStrAttr(appendStrAttr(req[:0], unix.NFTA_RULE_TABLE, table), unix.NFTA_RULE_CHAIN, ch.Name)
		err := d.dump(unix.NFT_MSG_GETRULE, byte(tableFamily(f)), req, func(msg []byte) error {
			if !attrIs(msg, unix.NFTA_RULE_TABLE, table) || !attrIs(msg, unix.NFTA_RULE_CHAIN, ch.Name) {
				return nil // the request asked for this chain only; be sure
			}
			ex, _ := findAttr(msg, unix.NFTA_RULE_EXPRESSIONS)
			have = canonRule(have, ex)
			return nil
		})
		switch {
		case errors.Is(err, errDumpInterrupted), errors.Is(err, unix.ENOENT):
			// Someone committed during the dump (what was read may be
			// half old, half new) or deleted the chain since it was
			// listed: rewriting it is always right (if it is gone, the
			// batch fails and the next full sync recreates it).
			obs.drift[ch.Name] = true
		case err != nil:
			return fmt.Errorf("dumping rules of %s: %w", ch.Name, err)
		case !bytes.Equal(want, have):
			obs.drift[ch.Name] = true
		}
	}
	return nil
}

// attrIs reports whether attribute typ of msg is the string s.
func attrIs(msg []byte, typ uint16, s string) bool {
	v, ok := findAttr(msg, typ)
	return ok && string(bytes.TrimRight(v, "\x00")) == s
}

func appendStrAttr(b []byte, typ uint16, s string) []byte {
	l := unix.NLA_HDRLEN + len(s) + 1
	b = binary.NativeEndian.AppendUint16(b, uint16(l))
	b = binary.NativeEndian.AppendUint16(b, typ)
	b = append(append(b, s...), 0)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

// setShapeAttrs are the set attributes that must be as miniproxy creates
// them: a set whose key, data or flags differ cannot be bound by the rules
// we write (or matches something else), and nf_tables cannot change them in
// place.
var setShapeAttrs = []uint16{unix.NFTA_SET_FLAGS, unix.NFTA_SET_KEY_TYPE, unix.NFTA_SET_KEY_LEN,
	unix.NFTA_SET_DATA_TYPE, unix.NFTA_SET_DATA_LEN, unix.NFTA_SET_TIMEOUT}

// setShape returns the shape attributes of a NEWSET message's or a set
// dump's attributes, as one comparable string.
func setShape(attrs []byte) string {
	var out []byte
	dt, _ := findAttr(attrs, unix.NFTA_SET_DATA_TYPE)
	for _, typ := range setShapeAttrs {
		v, _ := findAttr(attrs, typ)
		if typ == unix.NFTA_SET_DATA_LEN && string(dt) == "\xff\xff\xff\x00" {
			// A verdict's length is implied (the library sends 0,
			// the kernel reports its own size).
			v = nil
		}
		out = binary.BigEndian.AppendUint16(out, uint16(len(v)))
		out = append(out, v...)
	}
	return string(out)
}

// compareSets lists the sets of table t and records their names in obs; a
// desired set of another shape makes the table be rebuilt. The expected
// shape is what google/nftables encodes for the set we create.
func compareSets(d *dumper, f model.Family, t *gnft.Table, all *rs.Table, obs *observed) error {
	shapes := map[string]string{}
	req := appendStrAttr(nil, unix.NFTA_SET_TABLE, t.Name)
	err := d.dump(unix.NFT_MSG_GETSET, byte(tableFamily(f)), req, func(msg []byte) error {
		name, ok := findAttr(msg, unix.NFTA_SET_NAME)
		if !ok || !attrIs(msg, unix.NFTA_SET_TABLE, t.Name) {
			return nil
		}
		n := string(bytes.TrimRight(name, "\x00"))
		obs.sets[n] = true
		shapes[n] = setShape(msg)
		return nil
	})
	if err != nil && !errors.Is(err, errDumpInterrupted) {
		return fmt.Errorf("listing sets: %w", err)
	}
	capt, err := newCapture()
	if err != nil {
		return err
	}
	var sets []*rs.Set
	for _, s := range all.AllSets() {
		if _, ok := shapes[s.Name]; ok {
			if err := capt.conn.AddSet(setSpec(t, f, s), nil); err != nil {
				return fmt.Errorf("encoding set %s: %w", s.Name, err)
			}
			sets = append(sets, s)
		}
	}
	if len(sets) == 0 {
		return nil
	}
	msgs, err := capt.messages()
	if err != nil {
		return err
	}
	i := 0
	for _, m := range msgs {
		if int(m.Header.Type)&0xff != unix.NFT_MSG_NEWSET || len(m.Data) < 4 {
			continue
		}
		if i < len(sets) && shapes[sets[i].Name] != setShape(m.Data[4:]) && obs.rebuild == "" {
			obs.rebuild = "set " + sets[i].Name + " has another key, data type, flags or timeout"
		}
		i++
	}
	if i != len(sets) {
		return fmt.Errorf("encoding sets: %d messages for %d sets", i, len(sets))
	}
	return nil
}

func verdictString(k expr.VerdictKind, chain string) string {
	return fmt.Sprintf("%d %s", k, chain)
}

// reconcilePlan compares the desired table (all: the same, expanded) with
// what the kernel holds and returns the repairs, which include the changes
// since the last commit.
func reconcilePlan(committed, desired, all *rs.Table, obs *observed) *plan {
	if !obs.exists || obs.rebuild != "" {
		return replacePlan(all)
	}
	p := newPlan(desired.Family, desired.Name, desired.Sets)
	// What we committed is what the kernel should hold apart from drift;
	// chains that changed since are rewritten whatever the kernel shows
	// (the comparison would find them different anyway). Objects shared
	// with committed did not change.
	prevChains := map[string]*rs.Chain{}
	for _, c := range committed.Chains {
		prevChains[c.Name] = c
	}
	same := map[string]bool{}
	for name, so := range desired.Services {
		po := committed.Services[name]
		if po == so {
			for _, c := range all.Services[name].Chains {
				same[c.Name] = true
			}
			continue
		}
		p.services++
		if po != nil {
			for _, c := range committed.Objects(name).Chains {
				prevChains[c.Name] = c
			}
		}
	}
	for name := range committed.Services {
		if _, ok := desired.Services[name]; !ok {
			p.services++
		}
	}
	want := map[string]bool{}
	for _, c := range all.AllChains() {
		want[c.Name] = true
		if !obs.chains[c.Name] {
			p.addChains = append(p.addChains, c)
			p.writeChains = append(p.writeChains, c)
			continue
		}
		changed := false
		if !same[c.Name] {
			pc := prevChains[c.Name]
			changed = pc == nil || (pc != c && !reflect.DeepEqual(pc.Rules, c.Rules))
		}
		if changed || obs.drift[c.Name] {
			p.flushChains = append(p.flushChains, c.Name)
			p.writeChains = append(p.writeChains, c)
		}
	}
	for name := range obs.chains {
		if !want[name] {
			p.delChains = append(p.delChains, name)
		}
	}
	wantSet := map[string]bool{}
	for _, s := range all.AllSets() {
		wantSet[s.Name] = true
		if !obs.sets[s.Name] {
			p.addSets = append(p.addSets, s)
		}
	}
	for name := range obs.sets {
		if !wantSet[name] {
			p.delSets = append(p.delSets, name)
		}
	}
	elems := all.Elements()
	for _, s := range desired.Sets {
		if s.Timeout > 0 {
			continue
		}
		have := obs.elems[s.Name]
		seen := map[string]bool{}
		for _, e := range elems[s.Name] {
			k := string(elementKey(s.Key, e))
			seen[k] = true
			v, ok := have[k]
			if ok && (!s.Verdict || v == verdictString(verdictKind(e.Verdict.Kind), e.Verdict.Chain)) {
				continue
			}
			if ok {
				p.delElems[s.Name] = append(p.delElems[s.Name], e)
			}
			p.addElems[s.Name] = append(p.addElems[s.Name], e)
		}
		for k := range have {
			if !seen[k] {
				e, err := decodeKey(s.Key, desired.Family, []byte(k))
				if err != nil {
					// Not something we could have written: the
					// whole map is rewritten from scratch below.
					p.replace = true
					break
				}
				p.delElems[s.Name] = append(p.delElems[s.Name], e)
			}
		}
	}
	if p.replace {
		return replacePlan(all)
	}
	p.sortForDeterminism()
	return p
}

var errBadKey = errors.New("unexpected element key layout")

// decodeKey turns element key bytes back into an element (only the fields
// needed to delete it).
func decodeKey(k rs.KeyKind, f model.Family, b []byte) (rs.Element, error) {
	alen := 4
	if f == model.IPv6 {
		alen = 16
	}
	protoOf := func(n byte) model.Protocol {
		switch n {
		case 6:
			return model.TCP
		case 17:
			return model.UDP
		case 132:
			return model.SCTP
		}
		return ""
	}
	var e rs.Element
	switch k {
	case rs.KeySaddrDaddr:
		if len(b) != 2*alen || string(b[:alen]) != string(b[alen:]) {
			return e, errBadKey
		}
		e.Addr = addrFrom(b[:alen])
		return e, nil
	case rs.KeyDaddrProtoPort:
		if len(b) != alen+8 {
			return e, errBadKey
		}
		e.Addr = addrFrom(b[:alen])
		b = b[alen:]
		fallthrough
	case rs.KeyProtoPort:
		if len(b) != 8 {
			return e, errBadKey
		}
		e.Proto = protoOf(b[0])
		e.Port = uint16(b[4])<<8 | uint16(b[5])
		if e.Proto == "" {
			return e, errBadKey
		}
		return e, nil
	}
	return e, errBadKey
}

func addrFrom(b []byte) netip.Addr {
	a, _ := netip.AddrFromSlice(b)
	return a
}

// genID returns the nf_tables ruleset generation of the backend's namespace.
func (b *Backend) genID() (uint32, error) { return nfgen.Read(b.netns) }
