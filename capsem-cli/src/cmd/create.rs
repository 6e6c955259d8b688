//! `capsem create NAME [--cpus N] [--memory MIB] [--disk-size SIZE]
//! [--image REF [--registry-auth FILE]] [--net V] [-v SHARE] [-p PORTS]`: records a persistent
//! VM (`vm.json`), boots it and returns once its agent is ready; the name
//! goes to stdout. A VM that does not boot stays recorded (the error says
//! how to read its logs and remove it).

use std::os::unix::fs::DirBuilderExt;

use capsem_host::resources::{default_cpus, default_memory_mib};
use capsem_host::vmstate::{VmConfig, VM_FILE};

use crate::cli::{CreateArgs, Vmm};
use crate::context::{check_persistent_name, Ctx};
use crate::error::CliError;
use crate::exit::Exit;
use crate::spawn::Kind;
use crate::vmctl;

/// `capsem create NAME`: records the VM, boots it, returns once its agent
/// is ready. The name goes to stdout.
pub fn run(ctx: &Ctx, args: &CreateArgs) -> Result<Exit, CliError> {
    let name = args.name.as_str();
    check_persistent_name(name)?;
    let net = crate::netflags::resolve(&args.new, ctx.vmm)?;
    let shares = crate::share::parse_all(&args.new.volumes, ctx.vmm)?;
    let publish = crate::publish::resolve(&args.new.publish, ctx.vmm)?;
    let image = crate::vmimage::resolve_new(&ctx.home, &args.new, ctx.vmm)?;
    let _lock = ctx.lock(name)?;
    let dir = ctx.vm_dir(name);
    let vms = crate::home::vms_dir(&ctx.home);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&vms)
        .map_err(|source| CliError::Io {
            what: format!("cannot create {}", vms.display()),
            source,
        })?;
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(CliError::Exists(name.into()))
        }
        Err(source) => {
            return Err(CliError::Io {
                what: format!("cannot create {}", dir.display()),
                source,
            })
        }
    }
    let config = VmConfig {
        name: name.into(),
        temporary: false,
        created: capsem_host::vmstate::now_rfc3339(),
        vmm: ctx.vmm.as_arg().into(),
        accel: ctx.accel.as_arg().into(),
        cpus: args.cpus.unwrap_or_else(default_cpus),
        memory_mib: args.memory.unwrap_or_else(default_memory_mib),
        owner: None,
        disk_size: args.new.disk_size,
        image: image.map(|i| i.record),
        idle_timeout_ms: args.idle_timeout,
        max_duration_ms: args.max_duration,
        net,
        shares,
        publish,
    };
    if let Err(e) = capsem_host::vmstate::write_json(&dir.join(VM_FILE), &config) {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(e.into());
    }
    if ctx.vmm == Vmm::None {
        eprintln!("{}", crate::tempvm::NO_ISOLATION_WARNING);
    }
    vmctl::boot(ctx, &config, Kind::Persistent).map_err(|e| match e {
        CliError::Boot(reason) => CliError::NotBooted {
            name: name.into(),
            reason,
        },
        other => other,
    })?;
    println!("{name}");
    Ok(Exit::OK)
}
