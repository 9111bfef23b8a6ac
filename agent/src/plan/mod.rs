//! Plan: from a revision's rendered objects, the API server's discovery and the stored
//! inventory, decide what to apply in which stage and what to prune.
//!
//! Staging order lives here and nowhere else:
//! 1. definitions: CustomResourceDefinitions and Namespaces, which the rest may need;
//! 2. roles: ClusterRoles and Roles, which the revision's bindings may refer to (the
//!    API server checks a binding against its role's rules, so a binding to a role the
//!    revision adds cannot be dry-run before that role exists, unless the agent may
//!    `bind` any role, which would let it grant itself anything);
//! 3. other cluster-scoped objects;
//! 4. namespaced objects.
//!
//! Stages 3 and 4 are split in sync waves ([`WAVE_ANNOTATION`], default 0), in
//! ascending order: each wave holds its cluster-scoped objects, then its namespaced
//! ones. Definitions and roles come before every wave, since the dry run of the whole
//! revision needs them; a wave annotation on one of them is refused.
//!
//! Pruning runs the other way round: namespaced objects, then cluster-scoped ones,
//! then Namespaces and CRDs last (deleting those first would cascade).

use std::collections::{HashMap, HashSet};

use kube::api::{ApiResource, DynamicObject, ObjectMeta, TypeMeta};
use kube::core::GroupVersionKind;
use kube::discovery::{Discovery, Scope};
use serde_json::Value;

use crate::access::Access;
use crate::apply::Planned;
use crate::inventory::{Entries, Inventory, Origin};
use crate::object::ObjectId;
use crate::render::{Manifest, Problem, RenderError};
use crate::{FIELD_MANAGER, MANAGED_BY_LABEL};

mod scope;
pub use scope::resolve_scope;

/// Annotation: the sync wave of an object (a whole number; none is wave 0).
pub const WAVE_ANNOTATION: &str = "gitops.scale.dev/wave";

/// One sync wave: slices of [`Plan::cluster_scoped`] and [`Plan::namespaced`].
#[derive(Debug, Clone, Copy)]
pub struct Wave<'a> {
    pub number: i32,
    pub cluster_scoped: &'a [Planned],
    pub namespaced: &'a [Planned],
}

/// What one revision applies, stage by stage, and what it prunes.
#[derive(Debug, Default)]
pub struct Plan {
    /// CRDs and Namespaces.
    pub definitions: Vec<Planned>,
    /// ClusterRoles and Roles.
    pub roles: Vec<Planned>,
    /// In ascending wave order, as is `namespaced`.
    pub cluster_scoped: Vec<Planned>,
    pub namespaced: Vec<Planned>,
    /// The wave of each object of `cluster_scoped` and of `namespaced`, by position.
    cluster_scoped_waves: Vec<i32>,
    namespaced_waves: Vec<i32>,
    /// Objects the agent created for an earlier revision that this one no longer has,
    /// in deletion stages: each stage is deleted before the next starts.
    pub prune: Vec<Vec<Planned>>,
}

impl Plan {
    /// Every object to apply, in stage order.
    pub fn objects(&self) -> impl Iterator<Item = &Planned> {
        self.definitions.iter().chain(&self.roles).chain(&self.cluster_scoped).chain(&self.namespaced)
    }

    /// [`Self::objects`], moved out rather than copied.
    pub fn into_objects(self) -> Vec<Planned> {
        let mut objects = self.definitions;
        objects.extend(self.roles);
        objects.extend(self.cluster_scoped);
        objects.extend(self.namespaced);
        objects
    }

    /// The waves of stages 3 and 4, in ascending order (none if both are empty).
    pub fn waves(&self) -> Vec<Wave<'_>> {
        let mut numbers: Vec<i32> = self.cluster_scoped_waves.iter().chain(&self.namespaced_waves).copied().collect();
        numbers.sort_unstable();
        numbers.dedup();
        numbers
            .into_iter()
            .map(|number| {
                let of =
                    |waves: &[i32]| waves.partition_point(|w| *w < number)..waves.partition_point(|w| *w <= number);
                Wave {
                    number,
                    cluster_scoped: &self.cluster_scoped[of(&self.cluster_scoped_waves)],
                    namespaced: &self.namespaced[of(&self.namespaced_waves)],
                }
            })
            .collect()
    }

    /// The objects applied once the first `cluster_scoped` objects of stage 3 and
    /// `namespaced` of stage 4 are (with stages 1 and 2), and the others.
    pub fn split_applied(&self, cluster_scoped: usize, namespaced: usize) -> (Vec<Planned>, Vec<Planned>) {
        let (cluster_scoped, later_cluster_scoped) = self.cluster_scoped.split_at(cluster_scoped);
        let (namespaced, later_namespaced) = self.namespaced.split_at(namespaced);
        let applied = self.definitions.iter().chain(&self.roles).chain(cluster_scoped).chain(namespaced);
        (applied.cloned().collect(), later_cluster_scoped.iter().chain(later_namespaced).cloned().collect())
    }

    /// Adds an object of stage 3 or 4 in wave `wave`, after those added before it.
    fn push_in_wave(&mut self, planned: Planned, wave: i32, namespaced: bool) {
        if namespaced {
            self.namespaced.push(planned);
            self.namespaced_waves.push(wave);
        } else {
            self.cluster_scoped.push(planned);
            self.cluster_scoped_waves.push(wave);
        }
    }

    /// Puts stages 3 and 4 in wave order. Stable: within a wave, objects keep the
    /// order of the repository.
    fn sort_by_wave(&mut self) {
        fn sort(objects: &mut Vec<Planned>, waves: &mut Vec<i32>) {
            if waves.is_sorted() {
                return; // Most revisions have one wave.
            }
            let mut pairs: Vec<(i32, Planned)> = waves.drain(..).zip(objects.drain(..)).collect();
            pairs.sort_by_key(|(wave, _)| *wave);
            (*waves, *objects) = pairs.into_iter().unzip();
        }
        sort(&mut self.cluster_scoped, &mut self.cluster_scoped_waves);
        sort(&mut self.namespaced, &mut self.namespaced_waves);
    }

    /// The CRDs among the definitions, which must be Established before stage 2.
    pub fn crds(&self) -> Vec<Planned> {
        self.definitions.iter().filter(|p| is_crd(&p.id)).cloned().collect()
    }

    /// Whether the revision itself defines what `object` needs to exist: its
    /// namespace, the CRD of its kind, or the role it binds. Only such an object cannot
    /// be dry-run before the stages before its own are applied.
    pub fn defines_home_of(&self, object: &Planned) -> bool {
        let role = &object.object.data["roleRef"];
        let binds_new_role = is_binding(&object.id)
            && self.roles.iter().any(|r| {
                r.id.kind == role["kind"]
                    && r.id.name == role["name"]
                    && (r.id.kind == "ClusterRole" || r.id.namespace == object.id.namespace)
            });
        binds_new_role
            || self.definitions.iter().any(|definition| {
                let id = &definition.id;
                let data = &definition.object.data;
                (id.group.is_empty() && id.kind == "Namespace" && id.name == object.id.namespace)
                    || (is_crd(id)
                        && data["spec"]["group"] == object.id.group.as_str()
                        && data["spec"]["names"]["kind"] == object.id.kind.as_str())
            })
    }
}

fn is_crd(id: &ObjectId) -> bool {
    id.group == "apiextensions.k8s.io" && id.kind == "CustomResourceDefinition"
}

/// Kinds the API serves, plus those the revision's own CRDs are about to add, with
/// whether each is namespaced. Indexed once per plan: `Discovery::resolve_gvk` copies
/// every resource of the group version (and their subresources) on each call, and the
/// plan looked up every object twice.
struct Kinds {
    /// By apiVersion, then kind: looked up with the manifest's own strings, as a
    /// `GroupVersionKind` key would need three new ones per object.
    by_api_version: HashMap<String, HashMap<String, (ApiResource, bool)>>,
}

impl Kinds {
    fn new(discovery: &Discovery, manifests: &[Manifest]) -> Kinds {
        let mut kinds = Kinds { by_api_version: HashMap::new() };
        for group in discovery.groups() {
            for version in group.versions() {
                for (resource, caps) in group.versioned_resources(version) {
                    let namespaced = caps.scope == Scope::Namespaced;
                    // As `resolve_gvk`: the first of a version's resources with the kind.
                    kinds.add(resource, namespaced);
                }
            }
        }
        for m in manifests.iter().filter(|m| m.kind() == "CustomResourceDefinition") {
            let spec = &m.object["spec"];
            let (Some(group), Some(kind), Some(plural)) =
                (spec["group"].as_str(), spec["names"]["kind"].as_str(), spec["names"]["plural"].as_str())
            else {
                continue; // The dry run reports what is wrong with it.
            };
            let namespaced = spec["scope"].as_str() != Some("Cluster");
            for version in spec["versions"].as_array().into_iter().flatten() {
                let Some(version) = version["name"].as_str() else { continue };
                let resource = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
                // What the API server serves wins over what the revision says of it.
                kinds.add(resource, namespaced);
            }
        }
        kinds
    }

    /// Adds a kind unless it is known already.
    fn add(&mut self, resource: ApiResource, namespaced: bool) {
        let kinds = self.by_api_version.entry(resource.api_version.clone()).or_default();
        kinds.entry(resource.kind.clone()).or_insert((resource, namespaced));
    }

    fn resolve(&self, manifest: &Manifest) -> Option<&(ApiResource, bool)> {
        self.by_api_version.get(manifest.api_version())?.get(manifest.kind())
    }
}

/// Plans a revision. Fails with every object whose kind is unknown, whose scope is
/// wrong or that `access` refuses, each as `file:line: message`.
pub fn plan(
    mut manifests: Vec<Manifest>,
    discovery: &Discovery,
    default_namespace: &str,
    access: &Access,
    inventory: &Inventory,
) -> Result<Plan, Vec<RenderError>> {
    let kinds = Kinds::new(discovery, &manifests);
    scope::resolve_scope(
        &mut manifests,
        |manifest| kinds.resolve(manifest).map(|(_, namespaced)| *namespaced),
        default_namespace,
        access,
    )?;

    let mut plan = Plan::default();
    let mut bad_waves = Vec::new();
    for manifest in manifests {
        let (resource, namespaced) = kinds.resolve(&manifest).expect("resolve_scope rejected unknown kinds");
        let (resource, namespaced) = (resource.clone(), *namespaced);
        let wave = match wave(&manifest) {
            Ok(wave) => wave,
            Err(problem) => {
                bad_waves.push(RenderError { at: manifest.location, problem });
                continue;
            }
        };
        // Only an object with a wave may be refused for it, and needs its place kept.
        let at = wave.is_some().then(|| manifest.location.clone());
        let planned = planned(manifest, resource);
        if let Some(at) = at.filter(|_| is_definition(&planned.id) || is_role(&planned.id)) {
            bad_waves.push(RenderError { at, problem: Problem::EarlyWave { kind: planned.id.kind.clone() } });
            continue;
        }
        match (is_definition(&planned.id), namespaced) {
            (true, _) => plan.definitions.push(planned),
            _ if is_role(&planned.id) => plan.roles.push(planned),
            (false, namespaced) => plan.push_in_wave(planned, wave.unwrap_or_default(), namespaced),
        }
    }
    if !bad_waves.is_empty() {
        return Err(bad_waves);
    }
    plan.sort_by_wave();

    let desired: HashSet<&ObjectId> = plan.objects().map(|p| &p.id).collect();
    let mut prune: Vec<Planned> = inventory
        .owned()
        .filter(|(id, origin)| *origin == Origin::Created && !desired.contains(*id))
        .filter_map(|(id, _)| {
            // A kind the API no longer serves took its objects with it.
            let (resource, _) = discovery.groups().find(|g| g.name() == id.group)?.recommended_kind(&id.kind)?;
            let object = identity(id, &resource);
            Some(Planned { object, id: id.clone(), resource, origin: "inventory".to_owned(), source: None })
        })
        .collect();
    prune.sort_by_key(|p| (prune_order(&p.id), p.id.clone()));
    plan.prune = prune.chunk_by(|a, b| prune_order(&a.id) == prune_order(&b.id)).map(<[Planned]>::to_vec).collect();
    Ok(plan)
}

/// The object's [`WAVE_ANNOTATION`], if it has one.
fn wave(manifest: &Manifest) -> Result<Option<i32>, Problem> {
    let annotations = manifest.object["metadata"]["annotations"].as_object();
    // Render checked that annotations are strings.
    let Some(value) = annotations.and_then(|a| a.get(WAVE_ANNOTATION)).and_then(Value::as_str) else {
        return Ok(None);
    };
    value.trim().parse().map(Some).map_err(|_| Problem::Wave(value.to_owned()))
}

fn is_role(id: &ObjectId) -> bool {
    id.group == "rbac.authorization.k8s.io" && matches!(id.kind.as_str(), "ClusterRole" | "Role")
}

fn is_binding(id: &ObjectId) -> bool {
    id.group == "rbac.authorization.k8s.io" && matches!(id.kind.as_str(), "ClusterRoleBinding" | "RoleBinding")
}

fn is_definition(id: &ObjectId) -> bool {
    is_crd(id) || (id.group.is_empty() && id.kind == "Namespace")
}

fn prune_order(id: &ObjectId) -> u8 {
    match (is_definition(id), id.namespace.is_empty()) {
        (false, false) => 0,
        (false, true) => 1,
        (true, _) if id.kind == "Namespace" => 2,
        (true, _) => 3,
    }
}

/// The manifest as the agent applies it: labelled as managed by the agent.
fn planned(manifest: Manifest, resource: ApiResource) -> Planned {
    let (origin, source) = (manifest.location.to_string(), Some(manifest.source));
    let mut object = dynamic_object(manifest.object);
    object.metadata.labels.get_or_insert_default().insert(MANAGED_BY_LABEL.to_owned(), FIELD_MANAGER.to_owned());
    let id = ObjectId {
        group: resource.group.clone(),
        kind: resource.kind.clone(),
        namespace: object.metadata.namespace.clone().unwrap_or_default(),
        name: object.metadata.name.clone().unwrap_or_default(),
    };
    Planned { id, resource, object, origin, source }
}

/// The object as `serde_json::from_value` would give it, taken apart by hand: serde's
/// flattened fields (`types`, `data`) buffer every field of the object first.
fn dynamic_object(object: Value) -> DynamicObject {
    let Value::Object(mut fields) = object else { unreachable!("render keeps only objects") };
    let mut text = |field| match fields.remove(field) {
        Some(Value::String(text)) => text,
        _ => unreachable!("render checked apiVersion and kind"),
    };
    let types = TypeMeta { api_version: text("apiVersion"), kind: text("kind") };
    let metadata: ObjectMeta = fields
        .remove("metadata")
        .map(|metadata| serde_json::from_value(metadata).expect("render checked metadata"))
        .unwrap_or_default();
    DynamicObject { types: Some(types), metadata, data: Value::Object(fields) }
}

/// Just enough of an object to name it in a request.
fn identity(id: &ObjectId, resource: &ApiResource) -> DynamicObject {
    let mut object = DynamicObject::new(&id.name, resource);
    if !id.namespace.is_empty() {
        object.metadata.namespace = Some(id.namespace.clone());
    }
    object
}

/// What the inventory records for the planned objects once previews say which exist:
/// those already owned keep their origin, new ones are Created or Adopted.
pub fn entries<'a>(
    objects: impl IntoIterator<Item = &'a Planned>,
    exists: impl Fn(usize) -> bool,
    inventory: &Inventory,
) -> Entries {
    entries_where(objects, exists, inventory, |_| true)
}

/// [`entries`] of the objects the inventory does not list yet: what a stage must record
/// as pending before it applies (usually none, so the set stays small).
pub fn new_entries<'a>(
    objects: impl IntoIterator<Item = &'a Planned>,
    exists: impl Fn(usize) -> bool,
    inventory: &Inventory,
) -> Entries {
    entries_where(objects, exists, inventory, |id| !inventory.entries.contains_key(id))
}

fn entries_where<'a>(
    objects: impl IntoIterator<Item = &'a Planned>,
    exists: impl Fn(usize) -> bool,
    inventory: &Inventory,
    wanted: impl Fn(&ObjectId) -> bool,
) -> Entries {
    objects
        .into_iter()
        .enumerate()
        .filter(|(_, p)| wanted(&p.id))
        .map(|(i, p)| {
            let origin = inventory.origin(&p.id).unwrap_or(if exists(i) { Origin::Adopted } else { Origin::Created });
            (p.id.clone(), origin)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::ConfigMap;
    use serde_json::json;

    use super::*;
    use crate::render::Location;

    fn config_map(name: &str, wave: Option<&str>) -> Manifest {
        let mut object =
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": "shop"}});
        if let Some(wave) = wave {
            object["metadata"]["annotations"] = json!({ WAVE_ANNOTATION: wave });
        }
        Manifest::new(object, Location { file: "manifests/a.yaml".into(), line: 1 })
    }

    fn plan_of(manifests: Vec<Manifest>) -> Plan {
        let mut plan = Plan::default();
        for m in manifests {
            let wave = wave(&m).unwrap().unwrap_or_default();
            plan.push_in_wave(planned(m, ApiResource::erase::<ConfigMap>(&())), wave, true);
        }
        plan.sort_by_wave();
        plan
    }

    #[test]
    fn waves_ascend_and_unannotated_objects_are_wave_0() {
        let plan = plan_of(vec![
            config_map("late", Some("2")),
            config_map("plain", None),
            config_map("early", Some("-1")),
            config_map("also-late", Some(" 2 ")),
            config_map("zero", Some("0")),
        ]);
        let waves: Vec<(i32, Vec<&str>)> = plan
            .waves()
            .iter()
            .map(|w| (w.number, w.namespaced.iter().map(|p| p.id.name.as_str()).collect()))
            .collect();
        assert_eq!(waves, vec![(-1, vec!["early"]), (0, vec!["plain", "zero"]), (2, vec!["late", "also-late"])]);
    }

    #[test]
    fn what_a_wave_applied_is_its_objects_and_the_earlier_waves() {
        let plan = plan_of(vec![config_map("b1", Some("1")), config_map("a0", None), config_map("c2", Some("2"))]);
        let names = |objects: &[Planned]| objects.iter().map(|p| p.id.name.clone()).collect::<Vec<_>>();
        let waves = plan.waves();
        let through_1 = waves[0].namespaced.len() + waves[1].namespaced.len();
        let (applied, later) = plan.split_applied(0, through_1);
        assert_eq!((names(&applied), names(&later)), (vec!["a0".into(), "b1".into()], vec!["c2".to_owned()]));
    }

    #[test]
    fn a_wave_that_is_not_a_number_is_refused() {
        let error = wave(&config_map("bad", Some("first"))).unwrap_err();
        assert_eq!(error.to_string(), "annotation gitops.scale.dev/wave must be a whole number, found \"first\"");
        assert!(wave(&config_map("bad", Some("1.5"))).is_err());
    }

    #[test]
    fn a_revision_without_objects_has_no_waves() {
        assert!(Plan::default().waves().is_empty());
    }
}
